"""`samplerbench check`: the conformance checks pass a good solver and fail each kind of broken one on the check
that names its fault."""

import math

import pytest
import torch

import bench.tools.conformance as conformance
from bench import Solver, hookimpl
from bench.cli import main
from bench.registry import PluginManager

FAST_ORDER = (24, 48, 96)  # enough for a first- or second-order slope on gmm2d over [sigma_min, 0.5]


class Euler(Solver):
    """A correct third-party Euler: the reference the broken ones below are edits of."""

    order = 1

    def step(self, denoise, x, sigma, sigma_next):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            return denoised
        return x + (sigma_next - sigma) * (x - denoised) / sigma

    def sample(self, denoise, x, sigmas, plan, noise=None):
        sigma_list = sigmas.tolist()
        for sigma, sigma_next in zip(sigma_list[:-1], sigma_list[1:]):
            x = self.step(denoise, x, sigma, sigma_next)
        return x


class SkipsACall(Euler):
    """Declares one call per step but reuses its first denoised estimate at the second step of plans of 3+ steps."""

    def sample(self, denoise, x, sigmas, plan, noise=None):
        sigma_list = sigmas.tolist()
        denoised = None
        for i, (sigma, sigma_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
            if not (i == 1 and len(sigma_list) > 3):
                denoised = denoise(x, sigma)
            x = denoised if sigma_next == 0 else x + (sigma_next - sigma) * (x - denoised) / sigma
        return x


class WrongShape(Euler):
    def sample(self, denoise, x, sigmas, plan, noise=None):
        return super().sample(denoise, x, sigmas, plan)[:, :1]


class MakesNaN(Euler):
    def sample(self, denoise, x, sigmas, plan, noise=None):
        x = super().sample(denoise, x, sigmas, plan)
        return torch.where(torch.arange(len(x))[:, None] == 0, math.nan, x)


class MixesTheBatch(Euler):
    """Subtracts the batch mean's drift: each sample depends on which others share its batch."""

    def sample(self, denoise, x, sigmas, plan, noise=None):
        x = super().sample(denoise, x, sigmas, plan)
        return x - 0.1 * x.mean(0, keepdim=True)


class Stateful(Euler):
    """Keeps a counter across calls: the second call of one instance differs from the first."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def sample(self, denoise, x, sigmas, plan, noise=None):
        self.calls += 1
        return super().sample(denoise, x, sigmas, plan) * (1 + 1e-3 * (self.calls - 1))


class Overclaims(Euler):
    order = 2  # is Euler


BROKEN = {"skips-a-call": SkipsACall, "wrong-shape": WrongShape, "makes-nan": MakesNaN,
          "mixes-the-batch": MixesTheBatch, "stateful": Stateful, "overclaims": Overclaims}


@pytest.fixture(scope="module")
def plugins():
    module = type(math)("third_party_solvers")
    module.register_solvers = hookimpl(lambda register: [register(cls, name=name) for name, cls in
                                                         [("good-euler", Euler), *BROKEN.items()]])
    manager = PluginManager()
    manager.register(module, name="third-party")
    return manager


ONE_THREAD = True  # conftest.py: torch on one thread for this module


def verdicts(checks):
    return {check.name: check.passed for check in checks}


def test_a_good_solver_passes_every_check(plugins):
    checks = conformance.run_checks("good-euler", plugins=plugins, order_steps=FAST_ORDER)
    assert verdicts(checks) == dict.fromkeys(["counted NFE = plan", "shape, dtype, finite", "batch-size invariance",
                                              "reuse", "empirical order"], True)
    order = next(check for check in checks if check.name == "empirical order").measured
    fitted = float(order.split("fitted ")[1].split(";")[0])
    assert abs(fitted - 1) < 0.1 and order.endswith("declared 1")


# each fault fails its own check; some fail another as a consequence, named here
FAILURES = {
    "skips-a-call": {"counted NFE = plan"},
    "wrong-shape": {"counted NFE = plan", "shape, dtype, finite", "batch-size invariance", "reuse",
                    "empirical order"},  # the harness refuses every draw
    "makes-nan": {"shape, dtype, finite", "batch-size invariance", "reuse", "empirical order"},  # NaN != NaN
    "mixes-the-batch": {"batch-size invariance", "empirical order"},  # the mean's shift is an error of order 0
    "stateful": {"reuse", "batch-size invariance"},  # the harness calls one instance once per batch
    "overclaims": {"empirical order"},
}


@pytest.mark.parametrize("name", FAILURES)
def test_each_broken_solver_fails_its_check(plugins, name):
    checks = conformance.run_checks(name, plugins=plugins, max_budget=12, order_steps=FAST_ORDER)
    assert {check.name for check in checks if check.passed is False} == FAILURES[name]
    assert all(check.passed for check in checks if check.name not in FAILURES[name])


def test_the_nfe_check_names_the_budget(plugins):
    check = conformance.check_nfe(conformance.Subject("skips-a-call", {}, conformance.load_model("gmm2d"), plugins))
    assert check.measured == "budget 3: counted 2 calls, the plan (3 steps) declares 3"


def test_the_command_prints_a_line_per_check_and_exits_1_on_a_failure(plugins, monkeypatch, capsys):
    monkeypatch.setattr(conformance, "plugins_for_check", lambda: plugins)
    monkeypatch.setattr(conformance, "MAX_BUDGET", 8)
    monkeypatch.setattr(conformance, "ORDER_STEPS", (24, 48))
    assert main(["check", "stateful"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "samplerbench check stateful on gmm2d"
    assert [line.split()[0] for line in lines[1:6]] == ["PASS", "PASS", "FAIL", "FAIL", "PASS"]
    assert lines[4].startswith("FAIL  reuse") and "differ from a fresh one by" in lines[4]
    assert lines[-1] == "3 passed, 2 failed"
    monkeypatch.setattr(conformance, "ORDER_STEPS", FAST_ORDER)
    assert main(["check", "good-euler"]) == 0
    assert main(["check", "no-such-solver"]) == 2
    assert "unknown solver 'no-such-solver'" in capsys.readouterr().err
