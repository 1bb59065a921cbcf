"""Machinery shared by the higher-order solvers: half-log-SNR, the multistep history, order schedules.

In the sigma parametrization (alpha = 1) the half-log-SNR is lambda = -log sigma, and the step size of the
exponential integrators (DPM-Solver, DPM-Solver++, UniPC, DEIS) is h = lambda_next - lambda = log(sigma / sigma_next).
Dividing a VP sample by alpha leaves lambda and every exponential-integrator update unchanged, so these solvers
written in sigma are the VP papers' solvers exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor


def half_log_snr(sigmas: Tensor) -> Tensor:
    """lambda = -log sigma (float64); +inf at sigma = 0."""
    return -sigmas.to(torch.float64).log()


def step_pairs(sigmas: Tensor) -> Iterator[tuple[int, float, float]]:
    """(index, sigma, sigma_next) for each step of the grid, as Python floats (no device sync in the loop)."""
    values = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        yield i, sigma, sigma_next


def warmup_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order of each step of a multistep method: it can use at most i + 1 points at step i (warm-up), and
    the last step, to sigma = 0, is first order. With ``lower_order_final`` the last steps before it also drop
    order so that no step uses more points than remain (DPM-Solver++ and UniPC do this below ~15 steps, where
    high-order steps near sigma = 0 are unstable)."""
    orders = []
    for i in range(steps):
        remaining = steps - i
        step_order = min(order, i + 1)
        if lower_order_final:
            step_order = min(step_order, remaining)
        orders.append(step_order)
    orders[-1] = 1
    return orders


class History:
    """The last ``size`` values of a quantity (denoised estimates, their lambdas), newest last."""

    def __init__(self, size: int) -> None:
        self._items: deque = deque(maxlen=size)

    def push(self, item) -> None:
        self._items.append(item)

    def __getitem__(self, back: int):
        """history[-1] is the newest, history[-2] the one before."""
        return self._items[back]

    def __len__(self) -> int:
        return len(self._items)
