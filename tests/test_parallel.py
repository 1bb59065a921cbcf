"""The parallel samplers (paradigms, srds): they converge to their base's sequential samples, refuse bases without a
step rule, stay within the work and rounds their plan declares, and at their default tolerance lose nothing that the
samples' own noise would show."""

from dataclasses import dataclass, replace

import pytest
import torch

import bench
from bench.core.parallel import ParallelSolver, evaluate
from bench.core.sampling import get_solver
from bench.core.solver import Plan
from bench.errors import BenchError
from bench.measure.reference import solve_reference
from bench.core.options import SolverOptions
from plugins.srds import boundaries, pipeline_rounds

# one case per kind of step rule: one-step and multistep, data and noise prediction, ODE and SDE, UniPC's tuple state
BASES = [
    ("euler", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("euler-maruyama", {}), ("ipndm", {"order": 4}),
    ("deis", {"order": 3}), ("dpm-solver", {"method": "multistep", "order": 3}), ("dpm-solver++", {}),
    ("dpm-solver++", {"order": 3}), ("dpm-solver++", {"sde": True}), ("unipc", {"order": 3}),
]
NO_STEP_RULE = [("heun", {}), ("edm-stochastic", {}), ("rk45", {}), ("dpm-solver++", {"method": "singlestep"}),
                ("pndm", {"method": "plms"})]
NFE = 24


def case_id(case) -> str:
    name, options = case
    return name + "".join(f",{key}={value}" for key, value in options.items())


def draw(model, solver: str, **options) -> bench.SampleOutput:
    return bench.sample(model, solver, nfe=NFE, n=32, seed=3, dtype=torch.float64, schedule="karras", warmup=False,
                        **options)


@pytest.mark.parametrize("base, base_options", BASES, ids=[case_id(case) for case in BASES])
def test_paradigms_at_tolerance_zero_is_its_base(gmm2d, base, base_options):
    sequential = draw(gmm2d, base, **base_options)
    # window 1 is the sequential loop, whatever the tolerance: a step a round
    for options in ({"tolerance": 0.0, "window": 5}, {"tolerance": 0.0, "window": NFE}, {"window": 1}):
        parallel = draw(gmm2d, "paradigms", base=base, base_options=base_options, **options)
        torch.testing.assert_close(parallel.x, sequential.x, rtol=1e-10, atol=1e-10)
        assert parallel.rounds <= parallel.plan.max_rounds == NFE
        assert parallel.nfe <= parallel.plan.max_evals
        assert options.get("window") != 1 or parallel.rounds == parallel.nfe == NFE


@pytest.mark.parametrize("base, base_options", [case for case in BASES if case[0] != "unipc"],
                         ids=[case_id(case) for case in BASES if case[0] != "unipc"])
def test_srds_at_tolerance_zero_is_its_base(gmm2d, base, base_options):
    sequential = draw(gmm2d, base, **base_options)
    for coarse_steps in (None, 1, 7, NFE):
        parallel = draw(gmm2d, "srds", base=base, base_options=base_options, tolerance=0.0, coarse_steps=coarse_steps)
        torch.testing.assert_close(parallel.x, sequential.x, rtol=1e-10, atol=1e-10)
        assert parallel.rounds <= parallel.plan.max_rounds <= NFE
        assert parallel.nfe <= parallel.plan.max_evals


def test_few_rounds_are_not_enough(gmm2d):
    sequential = draw(gmm2d, "dpm-solver++")
    early = draw(gmm2d, "paradigms", base="dpm-solver++", tolerance=0.0, max_rounds=NFE // 2)
    assert early.rounds == NFE // 2
    assert (early.x - sequential.x).abs().max() > 1e-3
    coarse = draw(gmm2d, "srds", base="dpm-solver++", tolerance=0.0, max_iterations=1)
    assert (coarse.x - sequential.x).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["paradigms", "srds"])
@pytest.mark.parametrize("base, base_options", NO_STEP_RULE, ids=[case_id(case) for case in NO_STEP_RULE])
def test_bases_without_a_step_rule_are_refused(sampler, base, base_options):
    with pytest.raises(BenchError, match=r"needs a solver with a step rule.*(several times per step|chooses its own)"):
        get_solver(sampler, base=base, base_options=base_options)


def test_srds_refuses_a_base_that_carries_more_than_x():
    with pytest.raises(BenchError, match=r"SRDS \(base='unipc'\) needs a base whose state is x alone"):
        get_solver("srds", base="unipc")


def test_an_unknown_base_names_the_known_ones():
    with pytest.raises(BenchError, match=r"ddim"):
        get_solver("paradigms", base="no-such-solver")


def test_sequential_solvers_make_one_round_per_evaluation(gmm2d):
    for solver in ("ddim", "heun", "dpm-solver++"):
        out = draw(gmm2d, solver)
        assert out.rounds == out.nfe <= out.plan.nfe == out.plan.eval_bound == out.plan.round_bound


def test_parallel_counts_and_bounds(gmm2d):
    out = draw(gmm2d, "paradigms", base="ddim", window=6)
    plan = out.plan
    assert plan.nfe == NFE and plan.steps == NFE  # the base's budget and plan
    assert plan.max_rounds == NFE and plan.max_evals == sum(min(6, NFE - r) for r in range(NFE))
    assert 1 < out.rounds < NFE  # converged well before the sequential depth
    assert out.rounds <= out.nfe <= 6 * out.rounds  # each round evaluates at most a window per sample
    srds = get_solver("srds", base="ddim", coarse_steps=4)
    assert srds.plan(NFE).max_rounds == pipeline_rounds(boundaries(NFE - 1, 4), 4) == NFE  # all iterations: sequential
    assert get_solver("srds", base="ddim", coarse_steps=4, max_iterations=1).plan(NFE).max_rounds < NFE


def test_pipeline_rounds_recurrence():
    # 9 transitions in 3 intervals of 3: iteration 0 knows U_1..U_3 after rounds 1..3; iteration 1: U_1 = F(U_0)
    # after 3 rounds, U_2 after max(4, 1 + 3) = 4, U_3 after max(5, 2 + 3) = 5; one more for sigma = 0
    assert pipeline_rounds([0, 3, 6, 9], 1) == 6
    assert pipeline_rounds([0, 3, 6, 9], 3) == 10


def test_the_harness_refuses_more_than_the_declared_bound(gmm2d):
    @dataclass(frozen=True)
    class Options(SolverOptions):
        base: str = "ddim"
        base_options: dict | None = None
        tolerance: float | None = None

    class Greedy(ParallelSolver):  # evaluates every step of every sample, twice, in one call a step
        def bounds(self, steps: int) -> tuple[int, int]:
            return steps, steps

        def sample(self, denoise, x, sigmas, plan: Plan, noise=None):
            for sigma in sigmas[:-1].tolist():
                evaluate(denoise, [x, x], torch.tensor([sigma, sigma], dtype=x.dtype))
            return x

    Greedy.Options = Options
    with pytest.raises(BenchError, match=r"made 20 denoiser evaluations per sample, but its plan \(10 steps\) "
                                         r"declared at most 10"):
        bench.sample(gmm2d, Greedy(), nfe=10, n=4, warmup=False)

    class Slow(Greedy):  # declares fewer rounds than it takes
        def bounds(self, steps: int) -> tuple[int, int]:
            return 2 * steps, steps - 1

    with pytest.raises(BenchError, match=r"made 10 denoiser calls one after another, but its plan \(10 steps\) "
                                         r"declared at most 9"):
        bench.sample(gmm2d, Slow(), nfe=10, n=4, warmup=False)


def test_cuda_graph_is_refused_for_parallel_samplers(gmm2d):
    with pytest.raises(BenchError, match="cuda_graph"):
        bench.sample(gmm2d, "paradigms", nfe=10, n=4, cuda_graph=True, device="cpu")


_EXACT: dict = {}


def exact_endpoints(model, x_T: torch.Tensor) -> torch.Tensor:
    """The exact flow's endpoints from x_T, solved once per module (every case starts from the same x_T)."""
    key = (model.name, x_T.shape, float(x_T.sum()))
    if key not in _EXACT:
        _EXACT[key] = solve_reference(model, x_T)
    return _EXACT[key]


@pytest.mark.parametrize("sampler, options", [("paradigms", {}), ("srds", {})])
@pytest.mark.parametrize("base, base_options", [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm-solver++", {})],
                         ids=["ddim", "ddpm", "dpm-solver++"])
def test_default_tolerance_is_within_the_noise_of_sequential(gmm2d, sampler, options, base, base_options):
    # per-sample squared distance to the exact flow's endpoint from the same x_T: the parallel samples' mean must
    # lie within two standard errors of the sequential samples' mean (ODE bases: within a tenth of it)
    n, nfe = 256, 50
    sequential = bench.sample(gmm2d, base, nfe=nfe, n=n, seed=5, warmup=False, **base_options)
    parallel = bench.sample(gmm2d, sampler, nfe=nfe, n=n, seed=5, warmup=False, base=base,
                            base_options=base_options, **options)
    assert parallel.rounds < nfe or base_options  # an ODE base converges in fewer rounds than steps
    exact = exact_endpoints(gmm2d, sequential.x_T)
    errors_sequential = (sequential.x.double() - exact).square().sum(dim=1)
    errors_parallel = (parallel.x.double() - exact).square().sum(dim=1)
    noise = errors_sequential.std() / n**0.5
    assert (errors_parallel.mean() - errors_sequential.mean()).abs() < 2 * noise
    if not base_options:
        assert (errors_parallel.mean() - errors_sequential.mean()).abs() < 0.1 * noise


def test_parallel_plans_are_the_base_plans():
    for base, options in (("dpm-solver++", {"order": 3}), ("ipndm", {})):
        sequential = get_solver(base, **options).plan(37)
        for sampler in ("paradigms", "srds"):
            plan = get_solver(sampler, base=base, base_options=options).plan(37)
            assert replace(plan, max_evals=None, max_rounds=None) == sequential


SUITE = """
name = "parallel-tiny"
device = "cpu"
n = 64
seeds = [0]
nfe = [24, 48]
schedules = ["karras"]
metrics = ["trajectory_error"]

[[models]]
name = "gmm2d"

[[solvers]]
name = "ddim"

[[solvers]]
name = "paradigms"
base = "ddim"
base_options = { eta = 0.0 }
window = 4
label = "paradigms (ddim)"
"""


@pytest.mark.slow  # a whole run and report: about 30 s on a shared CPU
def test_a_suite_records_rounds_and_reports_quality_against_them(tmp_path):
    from bench.cli import main
    from bench.sweep.store import read_results

    (tmp_path / "parallel.toml").write_text(SUITE)
    report = tmp_path / "report.html"
    assert main(["run", str(tmp_path / "parallel.toml"), "--out", str(tmp_path), "--report", str(report),
                 "--quiet"]) == 0
    rows = read_results(tmp_path / "parallel-tiny.sqlite").set_index(["label", "nfe_budget"])
    assert (rows.loc["ddim", "rounds"] == rows.loc["ddim", "nfe"]).all()
    parallel = rows.loc["paradigms (ddim)"]
    assert (parallel["rounds"] < parallel.index).all() and (parallel["nfe"] > parallel["rounds"]).all()
    assert (parallel["trajectory_error"] - rows.loc["ddim", "trajectory_error"]).abs().max() < 1e-4
    page = report.read_text()
    assert "trajectory error vs rounds (model calls one after another)" in page
    assert "trajectory error vs wall-clock per cell [s]" in page


def test_a_cells_key_covers_the_base_solvers_code(tmp_path):
    import json

    from bench.sweep.suite import load_suite

    (tmp_path / "parallel.toml").write_text(SUITE)
    cells = {cell.solver.describe(): json.loads(cell.code) for cell in load_suite(tmp_path / "parallel.toml").cells}
    assert cells["paradigms (ddim)"]["base_solver"]["module"] == "plugins.ddim"
    assert "base_solver" not in cells["ddim"]
