"""Flow-matching (rectified-flow) models in the sigma parametrization: a network trained on the straight path
between data and noise, seen as a denoiser D(x; sigma).

A flow-matching model (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3; Flux) is trained on

    x_t = (1 - t) x0 + t eps,      t in [0, 1],

predicting the velocity v = dx_t/dt = eps - x0 (or x0 itself). Dividing by 1 - t gives the variance-exploding
state every solver here integrates,

    x = x_t / (1 - t) = x0 + sigma eps,        sigma = t / (1 - t),     t = sigma / (1 + sigma),

so a VE state at sigma goes into the network as x_t = x / (1 + sigma), at time t = sigma / (1 + sigma), and the
network's output becomes x0:

    "velocity":  x0 = x_t - t v        (x_t - t (eps - x0) = x0)
    "x0":        x0 = the output

Nothing else changes: an ODE solver integrates the same flow in either clock. Euler's step in sigma, x' = D +
(sigma' / sigma)(x - D), is Euler's step in t, x_t' = x_t + (t' - t) v, divided by 1 - t' (FlowMatchEuler's step).

t = 1 is pure noise, x_t = eps, where sigma is infinite. A model whose range reaches t = 1 stands it in with
sigma_max = PURE_NOISE_SIGMA = 1e8: x_T = 1e8 eps, which the network sees as x_t = eps (1 + 1e-8)^-1 at
t = 1 - 1e-8, both equal to eps and 1 in float32; the first step's ratio sigma' / sigma_max scales the rounding
of x - D back down. (In float16, whose largest number is 65504, pass t_max <= 1 - 1e-4.)

    model = bench.from_flow_matching(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))
    model = FlowMatchingDenoiser(velocity_fn, prediction="velocity", shape=(2,), t_min=1e-3, timestep_scale=1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import BenchError

PREDICTIONS = ("velocity", "x0")
PURE_NOISE_SIGMA = 1e8  # the sigma that stands in for t = 1 (module docstring)
FLOAT16_MAX = 65504.0


def flow_time(sigma: Any) -> Any:
    """t = sigma / (1 + sigma): the flow-matching time of a VE sigma (float, array or tensor)."""
    return sigma / (1 + sigma)


def sigma_of_flow_time(t: np.ndarray | float, pure_noise_sigma: float = PURE_NOISE_SIGMA) -> np.ndarray:
    """sigma = t / (1 - t), float64; t >= 1 (pure noise) becomes ``pure_noise_sigma``."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(t >= 1, pure_noise_sigma, t / np.maximum(1 - t, 0))


def shift_time(t: Any, shift: float) -> Any:
    """SD3's resolution shift of flow-matching time (Esser et al. 2024, eq. 23): t -> shift t / (1 + (shift - 1) t).
    It keeps 0 and 1 and, for shift > 1, moves every t in between towards 1 (more noise)."""
    return shift * t / (1 + (shift - 1) * t)


class FlowMatchingDenoiser(nn.Module):
    """A flow-matching network as a Denoiser: D(x; sigma, cond) -> x0 (see the module docstring).

    ``network(x_t, timestep, **conditioning)`` returns the prediction (a tensor, or an object with ``.sample``
    as diffusers' models return), with ``timestep = t * timestep_scale`` (1000 for diffusers' SD3 / Flux
    pipelines and schedulers). ``t_min`` and ``t_max`` are the model's time range: sigma_min = t_min / (1 - t_min),
    sigma_max = t_max / (1 - t_max) or PURE_NOISE_SIGMA when t_max = 1. ``shape`` is one sample's shape (read
    from a diffusers model's config when not given). ``flow_shift`` is the shift of its scheduler, the default of
    the ``flow`` schedule. ``cond`` goes to the network as the keyword ``cond_name`` (``class_labels`` for a
    class-conditional UNet2DModel, with ``num_classes``); None: unconditional.
    """

    def __init__(self, network: Callable[..., Any], prediction: str = "velocity", *, t_min: float = 1e-3,
                 t_max: float = 1.0, timestep_scale: float = 1000.0, shape: tuple[int, ...] | None = None,
                 flow_shift: float = 1.0, sigma_data: float = 0.5, num_classes: int | None = None,
                 cond_name: str = "class_labels", name: str = "flow-matching") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise BenchError(f"flow-matching prediction {prediction!r} is not supported "
                             f"(supported: {', '.join(PREDICTIONS)})")
        if not 0 < t_min < t_max <= 1:
            raise BenchError(f"a flow-matching model's time range needs 0 < t_min < t_max <= 1; got t_min={t_min!r}, "
                             f"t_max={t_max!r}")
        self.network = network
        self.prediction = prediction
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.sigma_min = float(sigma_of_flow_time(self.t_min))
        self.sigma_max = float(sigma_of_flow_time(self.t_max))
        self.timestep_scale = float(timestep_scale)
        self.shape = tuple(shape) if shape is not None else self._shape_from_config(network)
        self.flow_shift = float(flow_shift)
        self.sigma_data = float(sigma_data)
        self.num_classes = num_classes
        self.cond_name = cond_name
        self.name = name
        self.content_hash: str | None = None  # sha256 of the files it was loaded from (bench.adapters.diffusers)

    @staticmethod
    def _shape_from_config(network: Any) -> tuple[int, ...]:
        config = getattr(network, "config", None)
        size, channels = getattr(config, "sample_size", None), getattr(config, "in_channels", None)
        if size is None or channels is None:
            raise BenchError(f"cannot read one sample's shape from {type(network).__name__} (no config.sample_size "
                             "and config.in_channels): pass shape=(channels, height, width)")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(channels), int(height), int(width))

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """D(x; sigma) for x [batch, *shape] and sigma [batch]."""
        if x.dtype == torch.float16 and self.sigma_max > FLOAT16_MAX:
            raise ValueError(f"float16 cannot hold x_T = sigma_max eps with sigma_max = {self.sigma_max:.4g} "
                             f"(t_max = {self.t_max}): build the model with t_max <= 1 - 1e-4, or sample in float32 "
                             "or bfloat16")
        sigma = sigma.to(dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        # the time in at least float32 (float16 cannot hold 1 - 1e-4); the ends of the range exactly
        t = flow_time(sigma.to(torch.promote_types(sigma.dtype, torch.float32)))
        t = torch.where(sigma >= self.sigma_max, self.t_max, torch.where(sigma <= self.sigma_min, self.t_min, t))
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x_t = x / (1 + sigma)
        output = self.network(x_t.to(self._network_dtype(x)), t * self.timestep_scale, **self._conditioning(cond))
        output = getattr(output, "sample", output).to(x.dtype)
        if self.prediction == "x0":
            return output
        return x_t - t.to(x.dtype).reshape_as(sigma) * output  # "velocity": x0 = x_t - t v

    def _network_dtype(self, x: Tensor) -> torch.dtype:
        return getattr(self.network, "dtype", x.dtype) if isinstance(self.network, nn.Module) else x.dtype

    def _conditioning(self, cond: Tensor | None) -> dict[str, Tensor]:
        if cond is None:
            return {}
        if self.num_classes is None:
            raise ValueError(f"flow-matching model {self.name!r} is unconditional (num_classes is None): cond must "
                             "be None")
        return {self.cond_name: cond}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, shape={self.shape}, prediction={self.prediction!r}, t=[{self.t_min:.4g}, "
                f"{self.t_max:.4g}], sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}], "
                f"flow_shift={self.flow_shift:g}")


def from_flow_matching(network: nn.Module, scheduler: Any = None, *, prediction: str = "velocity",
                       sigma_data: float = 0.5, name: str = "flow-matching") -> FlowMatchingDenoiser:
    """Wrap a diffusers flow-matching network (a UNet2DModel, SD3Transformer2DModel...) and its
    FlowMatchEulerDiscreteScheduler as a Denoiser.

    The scheduler gives the time range (its training sigmas, which are flow-matching times: t_max = 1, t_min = the
    shifted 1 / num_train_timesteps), ``timestep_scale`` = num_train_timesteps, and ``flow_shift`` = its shift;
    without one, the range is [1e-3, 1] and the shift 1. Schedulers with dynamic (resolution-dependent) shifting
    are refused: their shift is chosen per image size at sampling time; give the ``flow`` schedule its shift.
    """
    options: dict[str, Any] = {}
    if scheduler is not None:
        config = scheduler.config
        if getattr(config, "use_dynamic_shifting", False):
            raise BenchError(f"{type(scheduler).__name__} with use_dynamic_shifting=True picks its shift per image "
                             "size when sampling; build the scheduler with use_dynamic_shifting=False and pass the "
                             "shift to the 'flow' schedule (schedule_options={'shift': ...})")
        if not hasattr(scheduler, "sigma_min") or not hasattr(config, "shift"):
            raise BenchError(f"scheduler {type(scheduler).__name__} is not a flow-matching scheduler (it has no "
                             "shift and sigma range); use FlowMatchEulerDiscreteScheduler")
        options = dict(t_min=float(scheduler.sigma_min), t_max=float(scheduler.sigma_max),
                       timestep_scale=float(config.num_train_timesteps), flow_shift=float(config.shift))
    return FlowMatchingDenoiser(network.eval() if isinstance(network, nn.Module) else network, prediction,
                                sigma_data=sigma_data, name=name, **options)
