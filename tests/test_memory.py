"""The memory budget: cells run in batches within it, cells that cannot fit are refused before sampling, and the
measuring stages work in blocks. Budgets of a few MB, set through the argument or the environment, stand in for
the cells of 10^7 samples they would refuse or batch on a real machine."""

import math

import pytest
import torch

import bench
from bench.core import memory
from bench.core.memory import BUDGET_ENV, Budget, measure_peak, memory_budget, parse_size
from bench.core.sampling import agreement_tolerance
from bench.errors import BenchError
from bench.measure.distances import feature_statistics, root_mean_square_difference
from bench.measure.features import feature_space_for


class Recording:
    """A model that records the batch size of every call it gets."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.name, self.shape, self.num_classes = model.name, model.shape, model.num_classes
        self.sigma_min, self.sigma_max, self.sigma_data = model.sigma_min, model.sigma_max, model.sigma_data

    def __call__(self, x, sigma, cond=None):
        self.calls.append(len(x))
        return self.model(x, sigma, cond)


# ------------------------------------------------------------------------------------------------ the budget

def test_sizes_with_units():
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("500 MB") == 500 * 10**6 and parse_size("3 gb") == 3 * 10**9
    assert parse_size("2e9") == 2 * 10**9 and parse_size(1234) == 1234 and parse_size("1.5kB") == 1500
    assert parse_size(" 7 ") == 7 and parse_size("+2MiB") == 2 * 2**20


@pytest.mark.parametrize("bad", ["4G", "4 GiBs", "lots", "", "1,000", "nan", "inf", "4GiB 2MB", True])
def test_a_size_that_is_not_one_says_which_units_there_are(bad):
    with pytest.raises(BenchError) as refused:
        parse_size(bad, BUDGET_ENV)
    message = str(refused.value)
    assert message.startswith(f"{BUDGET_ENV} {bad!r} is not a size")
    assert "kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)" in message


@pytest.mark.parametrize("bad", [0, -1, "-1", "-4GiB", "0 MB", "0.4"])
def test_a_size_below_one_byte_is_refused(bad):
    with pytest.raises(BenchError, match=rf"memory_budget must be positive \(at least one byte\); got {bad!r}"):
        parse_size(bad, "memory_budget")


def test_an_overflowing_size_is_refused():
    with pytest.raises(BenchError, match="'1e400' is too large to be a size"):
        parse_size("1e400")


def test_the_argument_wins_over_the_environment_which_wins_over_the_default(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    default = memory_budget("cpu")
    assert default.bytes > 0 and "default" in default.source
    monkeypatch.setenv(BUDGET_ENV, "3MB")
    assert memory_budget("cpu") == Budget(3 * 10**6, f"{BUDGET_ENV}=3MB")
    assert memory_budget("cpu", "2MiB").bytes == 2 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "three")
    with pytest.raises(BenchError, match=BUDGET_ENV):
        memory_budget("cpu")


def test_the_cpu_default_is_a_share_of_the_available_memory(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    available = memory.available_memory(torch.device("cpu"))
    assert available is not None and available > 2**27
    assert memory_budget("cpu").bytes == pytest.approx(memory.CPU_SHARE * available, rel=0.05)  # RAM moves


def test_the_arithmetic():
    # 10 MB budget, 4 MB kept, 1 kB a sample: 6,000 samples fit; never more than n; none when one does not fit
    assert memory.batch_that_fits(10**5, budget=10**7, kept=4 * 10**6, per_sample=1000) == 6000
    assert memory.batch_that_fits(100, budget=10**7, kept=4 * 10**6, per_sample=1000) == 100
    assert memory.batch_that_fits(100, budget=10**7, kept=10**7 - 999, per_sample=1000) == 0


def test_measured_peak_counts_what_is_alive_at_once():
    def run():
        big = torch.empty(2**20, dtype=torch.uint8)
        view = big[: 2**19]  # the same storage: no new memory
        del big, view
        small = torch.empty(2**19, dtype=torch.uint8)
        return small + 1  # 0.5 MB more, while small lives

    result, peak = measure_peak(run, "cpu")
    assert peak == 2**20 and len(result) == 2**19


# ---------------------------------------------------------------------------------------- batching samples

def test_a_cell_over_the_budget_runs_in_batches_with_the_same_samples(gmm2d):
    n = 20_000
    whole = bench.sample(gmm2d, "heun", nfe=9, n=n, batch_size=n, warmup=False)
    recording = Recording(gmm2d)
    (out, peak) = measure_peak(lambda: bench.sample(recording, "heun", nfe=9, n=n, memory_budget="2MB"), "cpu")
    probe, batches = recording.calls[:out.nfe], recording.calls[out.nfe:]  # the probe's calls come first
    assert probe == [memory.PROBE_SAMPLES] * out.nfe
    assert sum(batches) == out.nfe * n and set(batches) == {out.batch_size, n % out.batch_size}
    assert math.ceil(n / out.batch_size) >= 4
    assert peak <= 2 * 10**6  # the tensors the run made, at their peak, within the budget
    assert torch.equal(out.x_T, whole.x_T)  # bit for bit: noise is a function of (seed, index)
    torch.testing.assert_close(out.x, whole.x, rtol=0, atol=agreement_tolerance(torch.float32, gmm2d.sigma_max))


def test_the_budget_can_come_from_the_environment(gmm_image, monkeypatch):
    bench.sample(gmm_image, "euler", nfe=3, n=1)  # the model's parameters cast to float32 (its own, not the run's)
    monkeypatch.setenv(BUDGET_ENV, "4MB")  # gmm-image: ~37 kB a sample in a batch, 6 kB kept
    out, peak = measure_peak(lambda: bench.sample(gmm_image, "euler", nfe=3, n=400), "cpu")
    assert 20 < out.batch_size < 200 and peak <= 4 * 10**6
    monkeypatch.delenv(BUDGET_ENV)
    torch.testing.assert_close(out.x, bench.sample(gmm_image, "euler", nfe=3, n=400).x, rtol=0,
                               atol=agreement_tolerance(torch.float32, gmm_image.sigma_max))


def test_a_given_batch_size_is_used_as_given(gmm2d):
    recording = Recording(gmm2d)
    out = bench.sample(recording, "euler", nfe=3, n=5000, batch_size=5000, memory_budget="1MB", warmup=False)
    assert out.batch_size == 5000 and recording.calls == [5000] * 3


def test_a_cell_whose_samples_exceed_the_budget_is_refused_before_any_call(gmm_image):
    recording = Recording(gmm_image)
    # gmm-image at 10^7: 30.7 GB for each of x and x_T
    for batch_size in (None, 1000):
        with pytest.raises(BenchError) as refused:
            bench.sample(recording, "euler", nfe=4, n=10**7, memory_budget="24GB", batch_size=batch_size)
        message = str(refused.value)
        assert "gmm-image" in message and "61.4 GB" in message and "24 GB" in message
        assert "below 3,906,250" in message and f"{BUDGET_ENV}=" in message
    assert recording.calls == []


def test_a_cell_whose_working_set_cannot_fit_beside_its_samples_is_refused(gmm_image):
    # the kept samples fit (600 kB), but not one sample's working set beside them
    with pytest.raises(BenchError, match="one sample's working set .* does not fit"):
        bench.sample(gmm_image, "euler", nfe=4, n=100, memory_budget="620kB")


# -------------------------------------------------------------------------------------------- the cell check

def test_the_cell_check_counts_what_metrics_keep():
    shape, n = (3, 16, 16), 10_000  # samples 61 MB; features, data and reference float64 of 768 numbers each
    memory.check_cell("gmm-image euler", n, shape, torch.float32, "cpu", [], budget="62MB")
    memory.check_cell("gmm-image euler", n, shape, torch.float32, "cpu", ["fid"], feature_dim=2,
                      budget="170MB")  # 2-d features: 61.4 MB + 0.16 MB + 61.6 MB < 3/4 of 170 MB
    with pytest.raises(BenchError, match="samples' features") as refused:
        memory.check_cell("gmm-image euler", n, shape, torch.float32, "cpu", ["fid", "trajectory_error"],
                          budget="200MB")
    assert "x and x_T 61.4 MB + the reference solution 61.4 MB" in str(refused.value)


# ---------------------------------------------------------------------------------------- measuring stages

def test_features_are_extracted_in_batches(gmm_image):
    x = torch.randn(500, 3, 16, 16)
    calls = []
    space = feature_space_for(gmm_image)
    extract = space.extract
    space.extract = lambda batch: calls.append(len(batch)) or extract(batch)
    features = space(x, memory_budget="1MB")  # a quarter for a batch: 6 kB of float64 each with the margin
    assert len(calls) > 5 and sum(calls) == 500 and calls[0] == memory.PROBE_SAMPLES
    assert torch.equal(features, x.reshape(500, -1).double())


def test_statistics_and_rms_in_blocks_equal_one_block():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    features = torch.randn(3000, 16, generator=generator, dtype=torch.float64) @ mixing
    one, blocked = feature_statistics(features, memory_budget="1GB"), feature_statistics(features, "20kB")
    torch.testing.assert_close(blocked.mean, one.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocked.covariance, one.covariance, rtol=1e-12, atol=1e-14)
    other = features + 0.01 * torch.randn(3000, 16, generator=generator, dtype=torch.float64)
    direct = (features - other).pow(2).mean().sqrt().item()
    assert root_mean_square_difference(features.float(), other, "20kB") == pytest.approx(
        (features.float().double() - other).pow(2).mean().sqrt().item(), rel=1e-12)
    assert root_mean_square_difference(features, other, "1GB") == pytest.approx(direct, rel=1e-12)


# ------------------------------------------------------------------------------------------- bad budgets

@pytest.mark.parametrize("given", ["-1", "0", "12 parsecs"])
def test_a_bad_budget_is_refused_before_any_call(gmm2d, monkeypatch, given):
    recording = Recording(gmm2d)
    with pytest.raises(BenchError, match=f"memory_budget {given!r} is not a size|memory_budget must be positive"):
        bench.sample(recording, "euler", nfe=3, n=10, memory_budget=given)
    monkeypatch.setenv(BUDGET_ENV, given)
    with pytest.raises(BenchError, match=BUDGET_ENV):
        bench.sample(recording, "euler", nfe=3, n=10)
    assert recording.calls == []


# ------------------------------------------------------------------------------------------------ the runner

MIXED_SUITE = """
name = "mixed"
device = "cpu"
n = 32
seeds = [0]
nfe = [3]
metrics = ["trajectory_error"]

[[models]]
name = "gmm2d"

[[models]]
name = "gmm-image"

[[solvers]]
name = "euler"
"""


def test_the_runner_records_a_cell_over_the_budget_as_failed_without_drawing_it(tmp_path, monkeypatch):
    import bench.sweep.executors
    from bench.sweep.runner import run_suite
    from bench.sweep.store import read_results
    from bench.sweep.suite import load_suite
    from helpers import write_suite

    drawn = []
    draw = bench.sweep.executors.draw
    monkeypatch.setattr(bench.sweep.executors, "draw", lambda cell, *rest: drawn.append(cell.model.name)
                        or draw(cell, *rest))
    # gmm-image keeps 197 kB of x and x_T (float32) and 197 kB of reference solution (float64): over the 3/4 of
    # 450 kB that the metrics' blocks leave; gmm2d keeps under 2 kB
    monkeypatch.setenv(BUDGET_ENV, "450kB")
    summary = run_suite(load_suite(write_suite(tmp_path, MIXED_SUITE)), tmp_path / "results", progress=False)
    assert (summary.done, summary.failed) == (1, 1) and drawn == ["gmm2d"]
    rows = read_results(tmp_path / "results" / "mixed.sqlite").set_index("model")
    assert rows.loc["gmm2d", "status"] == "done" and rows.loc["gmm2d", "trajectory_error"] > 0
    assert rows.loc["gmm-image", "status"] == "failed"
    error = rows.loc["gmm-image", "error"]
    assert error.startswith("BenchError: cell gmm-image euler karras nfe=3 seed=0 on cpu at n = 32 keeps 393 kB")
    assert "x and x_T 197 kB + the reference solution 197 kB" in error
    assert f"memory budget of 450 kB ({BUDGET_ENV}=450kB)" in error
    assert "lower n below 27" in error and f"{BUDGET_ENV}=1MB" in error  # 393 kB / (3/4) with a tenth to spare


def test_a_malformed_budget_stops_the_suite_before_its_store_exists(tmp_path, monkeypatch):
    from bench.sweep.runner import run_suite
    from bench.sweep.suite import load_suite
    from helpers import write_suite

    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(BenchError, match=f"{BUDGET_ENV} 'lots' is not a size"):
        run_suite(load_suite(write_suite(tmp_path, MIXED_SUITE)), tmp_path / "results", progress=False)
    assert not (tmp_path / "results" / "mixed.sqlite").exists()
