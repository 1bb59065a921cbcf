"""bench.sample, the Python surface: per-sample seeding, counted NFE, conditioning, and errors a user can act on."""

import pytest
import torch

import bench
from bench.core.sampling import agreement_tolerance
from bench.errors import BenchError


def test_output_fields(gmm2d):
    out = bench.sample(gmm2d, "heun", nfe=9, n=10, seed=0, schedule="logsnr")
    assert out.x.shape == out.x_T.shape == (10, 2)
    assert out.x.dtype == torch.float32
    assert out.nfe == 9 and out.model_evals == 9 and out.plan.steps == 5
    assert out.seconds > 0
    assert out.sigmas[0].item() == pytest.approx(80.0)


def test_model_by_name_and_float64():
    out = bench.sample("gmm-image", "euler", nfe=3, n=2, dtype="float64")
    assert out.x.shape == (2, 3, 16, 16) and out.x.dtype == torch.float64


def test_sample_i_gets_the_same_x_T_whatever_n_or_batch(gmm2d):
    small = bench.sample(gmm2d, "euler", nfe=5, n=3, seed=7)
    large = bench.sample(gmm2d, "euler", nfe=5, n=50, seed=7, batch_size=8)
    assert torch.equal(large.x_T[:3], small.x_T)  # bit for bit: a pure function of (seed, sample index)
    # the samples only to rounding: the denoiser's batched arithmetic rounds differently in another batch
    torch.testing.assert_close(large.x[:3], small.x, rtol=0, atol=agreement_tolerance(torch.float32, gmm2d.sigma_max))
    other_seed = bench.sample(gmm2d, "euler", nfe=5, n=3, seed=8)
    assert not torch.equal(other_seed.x_T, small.x_T)


def test_x_T_is_sigma_max_times_unit_noise(gmm2d):
    out = bench.sample(gmm2d, "euler", nfe=2, n=4096, seed=0, dtype="float64")
    assert out.x_T.std().item() == pytest.approx(80.0, rel=0.05)


def test_labels_condition_the_samples(gmm2d):
    labels = torch.full((64,), 2)
    out = bench.sample(gmm2d, "heun", nfe=35, n=64, labels=labels)
    # class 2 is the mode at angle pi/2: (0, 1)
    assert torch.allclose(out.x.mean(0), torch.tensor([0.0, 1.0]), atol=0.1)


def test_guidance_counts_two_model_evaluations_per_call(gmm2d):
    labels = torch.arange(16) % 8
    guided = bench.sample(gmm2d, "euler", nfe=10, n=16, labels=labels, guidance=2.0)
    assert guided.nfe == 10 and guided.model_evals == 20
    plain = bench.sample(gmm2d, "euler", nfe=10, n=16, labels=labels, guidance=0.0)
    assert plain.model_evals == 10
    assert torch.equal(plain.x, bench.sample(gmm2d, "euler", nfe=10, n=16, labels=labels).x)
    assert not torch.allclose(guided.x, plain.x)


def test_classifier_free_guidance_formula(gmm2d):
    from bench.core.guidance import ClassifierFreeGuidance

    x, sigma, labels = torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 0.7, dtype=torch.float64), torch.arange(6)
    conditional, unconditional = gmm2d(x, sigma, labels), gmm2d(x, sigma)
    guided = ClassifierFreeGuidance(gmm2d, 3.0)(x, sigma, labels)
    torch.testing.assert_close(guided, conditional + 3.0 * (conditional - unconditional), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda m: bench.sample(m, "dpmsolver", nfe=5, n=2), r"unknown solver 'dpmsolver'"),
    (lambda m: bench.sample(m, "eulr", nfe=5, n=2), r"did you mean 'euler'\?"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=2, schedule="karas"), r"did you mean 'karras'\?"),
    (lambda m: bench.sample(m, "heun", nfe=0, n=2), r"'heun' needs an NFE budget of at least 1; got 0"),
    (lambda m: bench.sample(m, "ddim", nfe=5, n=2, etta=1.0), r"solver 'ddim' has no option 'etta' \(its options: eta\)"),
    (lambda m: bench.sample(m, "ddim", nfe=5, n=2, eta=-1.0), r"eta must be >= 0"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=2, dtype="float8"), r"unknown dtype 'float8'"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=0), r"n must be >= 1"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=2, labels=torch.tensor([0, 9])), r"label 9 is out of range"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=2, labels=torch.tensor([0])), r"labels must have shape \[2\]"),
    (lambda m: bench.sample(m, "euler", nfe=5, n=2, guidance=1.0), r"guidance needs labels"),
])
def test_bad_input(gmm2d, call, message):
    with pytest.raises(BenchError, match=message):
        call(gmm2d)


class Unconditional:
    shape = (2,)
    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 1.0
    num_classes = None
    name = "plain"

    def __call__(self, x, sigma, cond=None):
        return x / (1 + sigma[:, None] ** 2)


def test_guidance_or_labels_on_an_unconditional_model():
    model = Unconditional()
    assert isinstance(model, bench.Denoiser)
    with pytest.raises(BenchError, match=r"guidance=2.0 given, but model 'plain' is unconditional"):
        bench.sample(model, "euler", nfe=4, n=2, guidance=2.0)
    with pytest.raises(BenchError, match=r"labels given, but model 'plain' is unconditional"):
        bench.sample(model, "euler", nfe=4, n=2, labels=torch.tensor([0, 1]))
    assert bench.sample(model, "euler", nfe=4, n=2).x.shape == (2, 2)


def test_unknown_model():
    with pytest.raises(BenchError, match=r"unknown model 'gmm-imag'; did you mean 'gmm-image'\?"):
        bench.load_model("gmm-imag")


def test_counting_denoiser_counts_calls_not_claims(gmm2d):
    denoise = bench.CountingDenoiser(gmm2d)
    x = torch.zeros(5, 2)
    denoise(x, 1.0)
    denoise(x, torch.tensor(0.5))
    denoise(x, torch.full((5,), 0.1))
    assert denoise.nfe == 3 and denoise.model_evals == 3


def test_precision_options(gmm_image):
    fp32 = bench.sample(gmm_image, "euler", nfe=8, n=16)
    bf16 = bench.sample(gmm_image, "euler", nfe=8, n=16, precision="bf16")
    assert bf16.x.dtype == torch.float32  # the state keeps its dtype; only the network's products are bf16
    difference = (bf16.x - fp32.x).abs().max().item()
    assert 0 < difference < 0.2
    assert torch.equal(bench.sample(gmm_image, "euler", nfe=8, n=16, precision="tf32").x, fp32.x)  # CPU: no TF32
    with pytest.raises(BenchError, match=r"unknown precision 'fp8'"):
        bench.sample(gmm_image, "euler", nfe=8, n=16, precision="fp8")


def test_cuda_graph_needs_cuda(gmm2d):
    with pytest.raises(BenchError, match="cuda_graph needs a CUDA device"):
        bench.sample(gmm2d, "euler", nfe=4, n=4, cuda_graph=True)
