"""The flow-matching adapter (bench/adapters/flow_matching.py) on an analytic model.

gmm2d's data seen through the flow-matching interpolant x_t = (1 - t) x0 + t eps: its exact velocity, written here
in t from the mixture's parameters (not through the VE denoiser), wrapped by the adapter, must sample exactly as
gmm2d does in sigma: the same flow in another clock. Measured: 3e-16 to 1.1e-14 relative in float64.
"""

from __future__ import annotations

import pytest
import torch

import bench
from bench.adapters.flow_matching import PURE_NOISE_SIGMA, FlowMatchingDenoiser, flow_time, shift_time
from bench.errors import BenchError
from bench.core.sampling import make_sigmas


class MixtureFlow:
    """The exact flow-matching prediction of gmm2d's data at (x_t, t), from the mixture's parameters.

    Given component k, x_t = (1 - t) x0 + t eps is Gaussian: N((1 - t) mu_k, C_k), C_k = (1 - t)^2 Sigma_k + t^2 I,
    and E[x0 | x_t, k] = mu_k + (1 - t) Sigma_k C_k^-1 (x_t - (1 - t) mu_k). The components weigh in by their
    responsibilities w_k N(x_t; (1 - t) mu_k, C_k); the velocity is v = E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t.
    """

    def __init__(self, gmm, prediction: str = "velocity") -> None:
        self.log_weights, self.mu = gmm.weights.log(), gmm.mu  # [K], [K, d]
        self.covariance = (torch.einsum("kdr,kr,ker->kde", gmm.Q, gmm.lambdas, gmm.Q)
                           + gmm.c[:, None, None] * torch.eye(gmm.mu.shape[1], dtype=torch.float64))
        self.prediction = prediction
        self.times: list[torch.Tensor] = []

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        keep = (1 - t)[:, None, None]  # [B, 1, 1]
        cov = keep[..., None] ** 2 * self.covariance + (t**2)[:, None, None, None] * torch.eye(2, dtype=torch.float64)
        residual = x_t[:, None, :] - keep * self.mu  # [B, K, d]
        solved = torch.linalg.solve(cov, residual[..., None])[..., 0]
        log_normal = -0.5 * (residual * solved).sum(-1) - 0.5 * torch.logdet(cov)
        responsibilities = torch.softmax(self.log_weights + log_normal, dim=-1)
        posterior = self.mu + keep * torch.einsum("kde,bke->bkd", self.covariance, solved)
        return (responsibilities[..., None] * posterior).sum(1)

    def __call__(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.times.append(timestep)
        x0 = self.x0(x_t, timestep)
        return x0 if self.prediction == "x0" else (x_t - x0) / timestep[:, None]


def flow_gmm(gmm, prediction: str = "velocity") -> FlowMatchingDenoiser:
    """gmm2d's flow as a flow-matching network (timestep = t), over gmm2d's own sigma range."""
    return FlowMatchingDenoiser(MixtureFlow(gmm, prediction), prediction, shape=(2,), timestep_scale=1.0,
                                t_min=flow_time(gmm.sigma_min), t_max=flow_time(gmm.sigma_max), name="gmm2d-flow")


def test_the_velocity_is_the_denoiser_in_another_clock(gmm2d):
    model = flow_gmm(gmm2d)
    assert model.sigma_min == pytest.approx(gmm2d.sigma_min, rel=1e-13)
    assert model.sigma_max == pytest.approx(gmm2d.sigma_max, rel=1e-13)
    generator = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(64, dtype=torch.float64).uniform_(-6, 4, generator=generator))
    x = gmm2d.sample_data(64, seed=1) + sigma[:, None] * torch.randn(64, 2, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(model(x, sigma), gmm2d(x, sigma), rtol=1e-11, atol=1e-12)
    # the network saw x_t = x / (1 + sigma) at t = sigma / (1 + sigma)
    torch.testing.assert_close(model.network.times[-1], sigma / (1 + sigma), rtol=1e-15, atol=0)


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
@pytest.mark.parametrize("solver, options", [("euler", {}), ("heun", {}), ("dpm-solver++", {"order": 3}),
                                             ("unipc", {"order": 2})])
def test_sampling_in_flow_time_is_sampling_in_sigma(gmm2d, prediction, solver, options):
    for schedule in ("karras", "flow"):
        ours = bench.sample(flow_gmm(gmm2d, prediction), solver, nfe=9, n=128, seed=3, dtype=torch.float64,
                            schedule=schedule, warmup=False, **options)
        reference = bench.sample(gmm2d, solver, nfe=9, n=128, seed=3, dtype=torch.float64, schedule=schedule,
                                 warmup=False, **options)
        torch.testing.assert_close(ours.x_T, reference.x_T, rtol=1e-13, atol=0)  # sigma_max: 80 through t and back
        torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-13, atol=0)
        deviation = float((ours.x - reference.x).norm() / reference.x.norm())
        assert deviation <= 1e-12, (schedule, deviation)  # measured 3e-16 to 1.1e-14


class Recorder(torch.nn.Module):
    """A stand-in network: records its inputs, predicts zero velocity."""

    def forward(self, x_t, timestep):
        self.seen = (x_t.clone(), timestep.clone())
        return torch.zeros_like(x_t)


def test_pure_noise_stands_in_as_a_large_sigma():
    model = FlowMatchingDenoiser(Recorder(), shape=(3,))
    assert model.t_max == 1.0 and model.sigma_max == PURE_NOISE_SIGMA
    eps = torch.randn(4, 3)
    x_T = model.sigma_max * eps
    model(x_T, torch.full((4,), model.sigma_max))
    x_t, timestep = model.network.seen
    # in float32 the network sees diffusers' first input exactly: x_t = eps (to rounding), t = 1
    torch.testing.assert_close(x_t, eps, rtol=2e-7, atol=0)
    assert torch.equal(timestep, torch.full((4,), 1000.0))


def test_shift_time():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)


def test_flow_schedule_reads_the_models_shift():
    model = FlowMatchingDenoiser(Recorder(), shape=(3,), flow_shift=3.0)
    torch.testing.assert_close(make_sigmas("flow", 8, model), make_sigmas("flow", 8, model, shift=3.0), rtol=0,
                               atol=0)
    assert not torch.equal(make_sigmas("flow", 8, model), make_sigmas("flow", 8, model, shift=1.0))


def test_adapter_errors():
    with pytest.raises(BenchError, match=r"prediction 'epsilon' is not supported \(supported: velocity, x0\)"):
        FlowMatchingDenoiser(Recorder(), "epsilon", shape=(3,))
    with pytest.raises(BenchError, match=r"0 < t_min < t_max <= 1; got t_min=0.5, t_max=0.4"):
        FlowMatchingDenoiser(Recorder(), shape=(3,), t_min=0.5, t_max=0.4)
    with pytest.raises(BenchError, match=r"cannot read one sample's shape from Recorder.*pass shape="):
        FlowMatchingDenoiser(Recorder())
    model = FlowMatchingDenoiser(Recorder(), shape=(3,))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(2, 3), torch.ones(2), torch.tensor([0, 1]))


def test_float16_needs_a_smaller_t_max():
    model = FlowMatchingDenoiser(Recorder(), shape=(3,))
    with pytest.raises(ValueError, match=r"float16 cannot hold x_T.*t_max <= 1 - 1e-4"):
        model(torch.zeros(2, 3, dtype=torch.float16), torch.ones(2))
    small = FlowMatchingDenoiser(Recorder(), shape=(3,), t_max=1 - 1e-4)
    assert small.sigma_max == pytest.approx(9999, rel=1e-9)
    assert small(torch.zeros(2, 3, dtype=torch.float16), torch.ones(2)).dtype == torch.float16
