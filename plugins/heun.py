"""Heun's second-order method on the probability-flow ODE, as EDM's deterministic sampler (Karras et al. 2022,
Algorithm 1): an Euler step, then the trapezoidal correction with the slope at its end. The step to sigma = 0 is
left as plain Euler (it would divide by sigma = 0), so N steps cost 2N - 1 NFE."""

from __future__ import annotations

from torch import Tensor

from bench.hookspecs import hookimpl
from bench.solver import Denoise, Noise, Plan, Solver


class Heun(Solver):
    order = 2

    def __init__(self) -> None:
        pass

    def nfe_for_steps(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, denoise: Denoise, x: Tensor, sigmas: Tensor, plan: Plan, noise: Noise | None = None) -> Tensor:
        sigma_list = sigmas.tolist()
        for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            x = heun_step(denoise, x, denoised, sigma, sigma_next)
        return x


def heun_step(denoise: Denoise, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """From x at sigma (where D(x; sigma) = ``denoised``) to sigma_next > 0: Euler, then the trapezoidal rule."""
    derivative = (x - denoised) / sigma
    x_euler = x + (sigma_next - sigma) * derivative
    derivative_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (derivative + derivative_next)


@hookimpl
def register_solvers(register):
    register(Heun, name="heun")
