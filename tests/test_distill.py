"""The progressive-distillation students of the digits model: the distillation target against a Gaussian's exact
answer, the halving grid, the recipe (a few steps of it, deterministic), and the shipped students: verified loading,
sampled by the solver `distilled` only at their own NFE and grid."""

import json
import shutil

import pytest
import torch

import bench
from bench.adapters.checkpoints import load_checkpoint, pretrained_dir, read_manifest
from bench.cli import main
from bench.errors import BenchError
from bench.sweep.suite import parse_suite
from plugins.digits.denoiser import DigitsDenoiser, load_digits_model
from plugins.digits.distill import ddim_step, distill_recipe, distill_round, distillation_target
from plugins.digits.networks import DigitsUNet
from plugins.digits.students import STUDENT_STEPS, load_student, progressive, student_name
from plugins.digits.weights import CLASSIFIER_NAME, MODEL_NAME


ONE_THREAD = True  # conftest.py: small convolutions run many times slower on two shared threads


@pytest.fixture(scope="module")
def model():
    return bench.load_model("digits")


class Gaussian:
    """Data x ~ N(mean, variance I): its denoiser is exact, D(z; sigma) = mean + variance / (variance + sigma^2)
    (z - mean)."""

    def __init__(self, mean: torch.Tensor, variance: float) -> None:
        self.mean, self.variance = mean, variance

    def __call__(self, z, sigma, labels=None):
        shrink = (self.variance / (self.variance + sigma ** 2)).reshape(-1, *[1] * (z.dim() - 1))
        return self.mean + shrink * (z - self.mean)


@pytest.mark.parametrize("sigma_t, sigma_mid, sigma_s", [(80.0, 9.7, 0.97), (2.0, 0.8, 0.3), (80.0, 1.85, 0.0)])
def test_the_two_step_ddim_target_is_the_analytic_one_step_target(sigma_t, sigma_mid, sigma_s):
    # On a Gaussian every DDIM step is an affine map about the mean: z_b - mean = g(a, b) (z_a - mean) with
    # g(a, b) = k_a + (sigma_b / sigma_a) (1 - k_a), k_a = variance / (variance + sigma_a^2). Two steps compose to
    # g1 g2, and the one student step x~ + r (z - x~), r = sigma_s / sigma_t, lands there iff
    # x~ - mean = (g1 g2 - r) / (1 - r) (z - mean): written here from the closed form, not from the code.
    generator = torch.Generator().manual_seed(0)
    mean, variance = torch.randn(1, 1, 8, 8, generator=generator, dtype=torch.float64), 0.3
    z = mean + sigma_t * torch.randn(5, 1, 8, 8, generator=generator, dtype=torch.float64)

    def g(sigma_a, sigma_b):
        k = variance / (variance + sigma_a ** 2)
        return k + sigma_b / sigma_a * (1 - k)

    r = sigma_s / sigma_t
    expected = mean + (g(sigma_t, sigma_mid) * g(sigma_mid, sigma_s) - r) / (1 - r) * (z - mean)
    sigmas = [torch.full((5,), s, dtype=torch.float64) for s in (sigma_t, sigma_mid, sigma_s)]
    target = distillation_target(Gaussian(mean, variance), z, *sigmas, None)
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)
    # and a student whose estimate is x~ takes the teacher's two steps in one
    teacher = Gaussian(mean, variance)
    z_mid = ddim_step(teacher(z, sigmas[0]), z, sigmas[0], sigmas[1])
    two_steps = ddim_step(teacher(z_mid, sigmas[1]), z_mid, sigmas[1], sigmas[2])
    torch.testing.assert_close(ddim_step(target, z, sigmas[0], sigmas[2]), two_steps, rtol=1e-12, atol=1e-10)


def test_the_progressive_grid_of_n_steps_is_every_other_point_of_2n(model):
    for steps in (1, 2, 4, 8):
        assert torch.equal(progressive(steps, model), progressive(2 * steps, model)[::2])
    grid = progressive(16, model)
    assert grid[0] == model.sigma_max and grid[-1] == 0 and abs(grid[-2] - model.sigma_min) < 1e-15
    with pytest.raises(ValueError, match="its step counts are 1, 2, 4, 8, 16; got 3"):
        progressive(3, model)


def test_a_round_is_deterministic_given_the_seed(model):
    def run():
        student, record = distill_round(model, 2, steps=2, generator=torch.Generator().manual_seed(7),
                                        batch_size=8, log_every=0)
        return student, record

    (first, record), (second, _) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.network.conv_out.weight, model.network.conv_out.weight)  # it trained
    assert record["steps"] == 2 and record["loss"] > 0 and record["grid"] == progressive(2, model).tolist()


def copy_teacher(directory):
    """The shipped digits model and its classifier, with a manifest of just them, copied into ``directory``."""
    manifest = read_manifest()
    for name in (MODEL_NAME, CLASSIFIER_NAME):
        shutil.copy(pretrained_dir() / manifest[name]["file"], directory / manifest[name]["file"])
    (directory / "manifest.json").write_text(json.dumps({name: manifest[name] for name in (MODEL_NAME,
                                                                                            CLASSIFIER_NAME)}))
    return directory


@pytest.fixture(scope="module")
def tiny_students(tmp_path_factory):
    """The recipe, 2 steps of 8 images per round, in a folder holding a copy of the shipped digits model."""
    directory = copy_teacher(tmp_path_factory.mktemp("students"))
    entries = distill_recipe(["--steps", "2", "--batch-size", "8", "--rounds", "2", "--no-evaluate",
                              "--out", str(directory)])
    return directory, entries


def test_the_recipe_saves_each_student_with_its_record(tiny_students):
    directory, entries = tiny_students
    manifest = read_manifest(directory)
    assert [entry["file"] for entry in entries] == ["digits-student-8.safetensors", "digits-student-4.safetensors"]
    eight = manifest[student_name(8)]
    assert eight["recipe"] == "samplerbench train digits --distill" and eight["arguments"][:2] == ["--seed", "0"]
    assert eight["training"]["teacher_sha256"] == manifest[MODEL_NAME]["sha256"]
    assert manifest[student_name(4)]["training"]["distilled_from_sha256"] == eight["sha256"]
    teacher = load_digits_model(directory=directory)
    assert load_student(teacher, 4, directory).checkpoint_sha256 == manifest[student_name(4)]["sha256"]
    with pytest.raises(BenchError, match=r"digits-student-2.*samplerbench train digits --distill"):
        load_student(teacher, 2, directory)  # two rounds made no student of 2 steps


def test_the_command_line_runs_the_students_recipe_with_distill(tmp_path):
    directory = copy_teacher(tmp_path)
    assert main(["train", "digits", "--distill", "--steps", "1", "--batch-size", "4", "--rounds", "1",
                 "--no-evaluate", "--out", str(directory)]) == 0
    entry = read_manifest(directory)[student_name(8)]
    assert entry["arguments"][:4] == ["--seed", "0", "--steps", "1"] and entry["training"]["steps"] == 1


def test_distilled_samples_only_at_its_own_nfe_and_grid(tiny_students, monkeypatch):
    directory, _ = tiny_students
    monkeypatch.setenv("SAMPLERBENCH_PRETRAINED", str(directory))
    teacher = load_digits_model(directory=directory)
    out = bench.sample(teacher, "distilled", nfe=4, n=6, schedule="progressive", labels="balanced")
    assert out.nfe == 4 and out.x.shape == (6, 1, 8, 8) and bool(torch.isfinite(out.x).all())
    # the same as DDIM with the student as the model, on its grid
    student = load_student(teacher, 4, directory)
    ddim = bench.sample(student, "ddim", nfe=4, n=6, schedule="progressive", labels="balanced")
    torch.testing.assert_close(out.x, ddim.x, rtol=0, atol=1e-5)
    with pytest.raises(BenchError, match=r"students take 1, 2, 4, 8 steps; got NFE 3"):
        bench.sample(teacher, "distilled", nfe=3, n=2, schedule="progressive")
    with pytest.raises(BenchError, match=r"distilled on the grid .* schedules = \[\"progressive\"\]"):
        bench.sample(teacher, "distilled", nfe=4, n=2, schedule="karras")
    stranger = DigitsDenoiser(DigitsUNet(), teacher.extractor)  # a digits model in memory: not the teacher
    with pytest.raises(BenchError, match="was distilled from the digits checkpoint with sha256"):
        bench.sample(stranger, "distilled", nfe=4, n=2, schedule="progressive")


def test_a_suite_refuses_other_budgets_for_distilled_when_it_is_read():
    suite = {"models": [{"name": "digits"}], "labels": "balanced",
             "solvers": [{"name": "distilled", "nfe": [4, 6], "schedules": ["progressive"]}]}
    with pytest.raises(BenchError, match=r"solvers\[1\]: solver 'distilled' .* got NFE 6"):
        parse_suite(suite)


def test_the_shipped_students_load_verified_from_the_shipped_teacher(model):
    manifest = read_manifest()
    for steps in STUDENT_STEPS:
        entry = manifest[student_name(steps)]
        assert load_checkpoint(student_name(steps)).sha256 == entry["sha256"]
        assert entry["training"]["teacher_sha256"] == manifest[MODEL_NAME]["sha256"]
        student = load_student(model, steps)
        assert student.checkpoint_sha256 == entry["sha256"] and torch.equal(student.grid, progressive(steps, model))


def test_the_shipped_one_step_student_draws_digits_of_their_label(model):
    labels = torch.arange(100) % 10
    out = bench.sample(model, "distilled", nfe=1, n=100, seed=3, schedule="progressive", labels=labels)
    assert out.nfe == 1
    accuracy = (model.classify(out.x).argmax(1) == labels).double().mean().item()
    assert accuracy > 0.8, accuracy


def test_a_tampered_student_is_refused(model, tmp_path):
    directory = copy_teacher(tmp_path)
    manifest = read_manifest()
    entry = manifest[student_name(2)]
    data = bytearray((pretrained_dir() / entry["file"]).read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (directory / entry["file"]).write_bytes(bytes(data))
    listed = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**listed, student_name(2): entry}))
    with pytest.raises(BenchError, match=r"digits-student-2.* does not match its manifest, refusing to load it"):
        load_student(model, 2, directory)
