"""The analytic Gaussian-mixture models (plugins/analytic.py).

The closed-form denoiser is checked against an independent computation: dense covariances, log p_sigma from
torch.distributions.MultivariateNormal, and Tweedie's formula D(x; sigma) = x + sigma^2 grad log p_sigma(x) with
the gradient taken by autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

import bench.core.denoiser
import plugins.analytic
from bench.registry import PluginManager
from plugins.analytic import GaussianMixture, load_gmm2d, load_gmm_image

SIGMAS = (0.002, 0.05, 0.5, 5.0, 80.0)
SIGMA_CASES = [*SIGMAS, "mixed"]  # "mixed": a different sigma per sample within one batch
BATCH = 10


@pytest.fixture(scope="module")
def gmm2d() -> GaussianMixture:
    return load_gmm2d()


@pytest.fixture(scope="module")
def gmm_image() -> GaussianMixture:
    return load_gmm_image()


@pytest.fixture(scope="module", params=["gmm2d", "gmm-image"])
def model(request) -> GaussianMixture:
    return request.getfixturevalue({"gmm2d": "gmm2d", "gmm-image": "gmm_image"}[request.param])


class DenseReference:
    """log p_sigma(x) of a model's mixture from dense covariances, with nothing shared with its closed forms."""

    def __init__(self, model: GaussianMixture, sigmas: tuple[float, ...] = SIGMAS) -> None:
        self.model = model
        d = model.feature_dim
        eye = torch.eye(d, dtype=torch.float64)
        covariances = torch.stack([Q @ torch.diag(lambdas) @ Q.T + c * eye
                                   for Q, lambdas, c in zip(model.Q, model.lambdas, model.c)])
        # one Cholesky per (sigma, component), made once: at d = 768 they are the expensive part of this file
        self.normals = {sigma: MultivariateNormal(model.mu, validate_args=False,
                                                  scale_tril=torch.linalg.cholesky(covariances + sigma**2 * eye))
                        for sigma in sigmas}

    def log_density(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        x = x.reshape(len(x), -1)
        log_weights = self.model.weights.log().expand(len(x), -1)
        if cond is not None:
            log_weights = log_weights.masked_fill(self.model.component_class != cond[:, None], -math.inf)
        log_components = torch.zeros_like(log_weights)
        for s in sigma.unique().tolist():
            rows = (sigma == s).nonzero()[:, 0]
            log_components = log_components.index_put((rows,), self.normals[s].log_prob(x[rows, None, :]))
        return torch.logsumexp(log_weights + log_components, dim=-1)

    def tweedie(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """E[x0 | x] = x + sigma^2 grad_x log p_sigma(x)."""
        x = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(self.log_density(x, sigma, cond).sum(), x)
        return (x + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2 * score).detach()


@pytest.fixture(scope="module")
def references(gmm2d, gmm_image) -> dict[str, DenseReference]:
    return {"gmm2d": DenseReference(gmm2d), "gmm-image": DenseReference(gmm_image)}


def sigma_batch(case: float | str, batch: int = BATCH) -> Tensor:
    if case == "mixed":
        return torch.tensor(SIGMAS, dtype=torch.float64).repeat(math.ceil(batch / len(SIGMAS)))[:batch]
    return torch.full((batch,), case, dtype=torch.float64)


def noised_data(model: GaussianMixture, sigma: Tensor, seed: int, labels: Tensor | None = None) -> Tensor:
    """x = x0 + sigma * eps with x0 an exact data sample: where the denoiser is actually evaluated."""
    x0 = model.sample_data(len(sigma), seed=seed, labels=labels)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x0 + sigma.view(-1, *[1] * len(model.shape)) * eps


def random_labels(model: GaussianMixture, n: int, seed: int) -> Tensor:
    return torch.randint(model.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
@pytest.mark.parametrize("case", SIGMA_CASES, ids=str)
def test_denoiser_is_tweedie(model, references, case, conditional):
    sigma = sigma_batch(case)
    x = noised_data(model, sigma, seed=1)
    # labels drawn independently of x: the class restriction then matters, not just the nearest mode
    cond = random_labels(model, BATCH, seed=2) if conditional else None
    expected = references[model.name].tweedie(x, sigma, cond)
    torch.testing.assert_close(model(x, sigma, cond), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_log_density_matches_dense(model, references, conditional):
    sigma = sigma_batch("mixed", 2 * len(SIGMAS))
    x = noised_data(model, sigma, seed=3)
    cond = random_labels(model, len(sigma), seed=4) if conditional else None
    expected = references[model.name].log_density(x, sigma, cond)
    torch.testing.assert_close(model.log_density(x, sigma, cond), expected, rtol=1e-10, atol=1e-10)


def test_modes_mix_somewhere(gmm_image):
    """Guards the exactness tests against vacuity: at sigma = 5 the responsibilities are far from one-hot, so the
    normalising constants (log det) and the weights enter D, not only the nearest mean."""
    sigma = sigma_batch(5.0)
    x = noised_data(gmm_image, sigma, seed=1).reshape(len(sigma), -1)
    params = gmm_image._parameters_as(torch.float64, x.device)
    log_joint, *_ = gmm_image._components(x, sigma, None, params)
    assert torch.softmax(log_joint, -1).max(-1).values.min() < 0.9


# ------------------------------------------------------------------------------------------------- moments

def dense_moments(model: GaussianMixture, label: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean and covariance from E[x x^T] = sum_k w_k (Sigma_k + mu_k mu_k^T), with dense Sigma_k."""
    weights = model.weights.clone()
    if label is not None:
        weights = torch.where(model.component_class == label, weights, 0.0)
        weights = weights / weights.sum()
    eye = torch.eye(model.feature_dim, dtype=torch.float64)
    mean = sum(w * mu for w, mu in zip(weights, model.mu))
    second_moment = sum(w * (Q @ torch.diag(lambdas) @ Q.T + c * eye + torch.outer(mu, mu))
                        for w, mu, Q, lambdas, c in zip(weights, model.mu, model.Q, model.lambdas, model.c))
    return mean, second_moment - torch.outer(mean, mean)


@pytest.mark.parametrize("label", [None, 3])
def test_moments_match_direct_formula(model, label):
    mean, covariance = dense_moments(model, label)
    torch.testing.assert_close(model.mean(label), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.covariance(label), covariance, rtol=1e-12, atol=1e-12)
    assert model.sigma_data == pytest.approx(math.sqrt(model.covariance().trace().item() / model.feature_dim))


def test_gmm2d_moments_by_hand(gmm2d):
    """Ring of radius 1 with rank-1 tangential variance lambda plus c: by symmetry the mean is 0 and the
    covariance is (1/2 + lambda/2 + c) I (the average of u u^T over equally spaced unit vectors u is I/2)."""
    lambda_, c = 0.02, 0.005
    torch.testing.assert_close(gmm2d.mean(), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(gmm2d.covariance(), (0.5 + lambda_ / 2 + c) * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("label", [None, 3])
def test_moments_match_samples(model, label):
    """Monte Carlo check at 5 standard errors: per coordinate for the mean, per entry for the covariance projected
    onto a few random directions (all of it for gmm2d), the standard errors estimated from the samples themselves.
    With ~800 such tests a correct model fails with probability below 1e-3. For gmm2d's class 3, a single
    component, this resolves its variances to 0.3%."""
    n = 200_000 if model.feature_dim < 10 else 8_000
    labels = None if label is None else torch.full((n,), label)
    x = model.features(model.sample_data(n, seed=5, labels=labels))
    mean, covariance = model.mean(label), model.covariance(label)

    standard_error = (covariance.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= 5 * standard_error).all()

    directions = torch.linalg.qr(torch.randn(model.feature_dim, 3, generator=torch.Generator().manual_seed(6),
                                             dtype=torch.float64)).Q
    projected = (x - mean) @ directions  # centred on the exact mean, so the plain average is unbiased
    products = projected[:, :, None] * projected[:, None, :]
    standard_error = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - directions.T @ covariance @ directions).abs() <= 5 * standard_error).all()


def test_samples_follow_each_component(gmm_image):
    """Within class 0 (components 0 and 1, far apart, weights 0.32 : 0.68), assign samples to the nearest mean and whiten them in each
    component's own basis: z = Q^T (x - mu) has variance lambda + c per coordinate, the residual c per dimension,
    and the components' shares follow their weights. Each checked at 5 standard errors."""
    n, label = 8_000, 0
    x = gmm_image.features(gmm_image.sample_data(n, seed=16, labels=torch.full((n,), label)))
    components = (gmm_image.component_class == label).nonzero()[:, 0]
    nearest = torch.cdist(x, gmm_image.mu[components]).argmin(-1)
    shares = gmm_image.weights[components] / gmm_image.weights[components].sum()
    d, r = gmm_image.feature_dim, gmm_image.Q.shape[-1]
    for j, k in enumerate(components.tolist()):
        delta = x[nearest == j] - gmm_image.mu[k]
        count = len(delta)
        assert abs(count / n - shares[j]) <= 5 * math.sqrt(shares[j] * (1 - shares[j]) / n)
        z = delta @ gmm_image.Q[k]
        residual = delta - z @ gmm_image.Q[k].T
        principal_ratio = (z.square() / (gmm_image.lambdas[k] + gmm_image.c[k])).mean()
        assert abs(principal_ratio - 1) <= 5 * math.sqrt(2 / (count * r))
        isotropic_ratio = residual.square().sum(-1).mean() / (gmm_image.c[k] * (d - r))
        assert abs(isotropic_ratio - 1) <= 5 * math.sqrt(2 / (count * (d - r)))


def test_labelled_samples_come_from_their_class(gmm2d):
    labels = torch.arange(gmm2d.num_classes).repeat(50)
    x = gmm2d.sample_data(len(labels), seed=7, labels=labels)
    nearest_mode = torch.cdist(x, gmm2d.mu).argmin(-1)
    # modes are ~5 standard deviations apart: essentially every sample is nearest its own mode
    assert (gmm2d.component_class[nearest_mode] == labels).float().mean() > 0.99


# ------------------------------------------------------------------------------------------------ precision

@pytest.mark.parametrize("case", SIGMA_CASES, ids=str)
def test_float32_agrees_with_float64(model, case):
    sigma = sigma_batch(case, 64)
    labels = random_labels(model, len(sigma), seed=8)
    x = noised_data(model, sigma, seed=9, labels=labels)
    # The responsibilities come from log densities that are sums of d terms; float32 resolves those to about
    # d * 2^-24 * (a few), ~1e-4 at d = 768 and large sigma, and D moves by that times the spread of the means.
    # Measured: ~1e-6 of sigma_data for gmm2d at every sigma, 4e-4 for gmm-image at sigma = 80.
    tolerance = max(1e-4, 2e-6 * model.feature_dim) * model.sigma_data
    for cond in (None, labels):
        denoised64 = model(x, sigma, cond)
        denoised32 = model(x.float(), sigma.float(), cond)
        assert denoised32.dtype == torch.float32
        assert (denoised32.double() - denoised64).abs().max() < tolerance
    log_density64 = model.log_density(x, sigma)
    log_density32 = model.log_density(x.float(), sigma.float())
    assert ((log_density32.double() - log_density64).abs() / log_density64.abs().clamp(min=1)).max() < 1e-4


# --------------------------------------------------------------------------------------------------- limits

def test_small_sigma_returns_the_input(model):
    """On the data, D(x; sigma) - x = -sigma^2 (Sigma_k + sigma^2 I)^-1 (x - mu_k): it vanishes like sigma^2."""
    x = model.sample_data(64, seed=10)

    def error(sigma: float) -> float:
        return (model(x, torch.full((len(x),), sigma, dtype=torch.float64)) - x).abs().max().item()

    assert error(model.sigma_min) < 0.01 * model.sigma_data
    assert error(1e-4) / error(1e-3) == pytest.approx(1e-2, rel=0.05)


@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_large_sigma_returns_the_mean(model, conditional):
    """For x ~ N(0, sigma^2 I), D(x; sigma) -> E[x0 | class]. p_sigma tends to N(mean, Cov + sigma^2 I), whose
    denoiser is mean + Cov (Cov + sigma^2 I)^-1 (x - mean): to first order D - mean = Cov (x - mean) / sigma^2,
    which shrinks like 1/sigma."""
    n = 64
    eps = torch.randn(n, model.feature_dim, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cond = random_labels(model, n, seed=12) if conditional else None
    labels = cond.tolist() if conditional else [None] * n
    moments = {label: (model.mean(label), model.covariance(label)) for label in set(labels)}
    means = torch.stack([moments[label][0] for label in labels])

    def gap(sigma: float) -> Tensor:
        x = sigma * eps
        denoised = model(x.reshape(n, *model.shape), torch.full((n,), sigma, dtype=torch.float64), cond)
        return (denoised.reshape(n, -1) - means).norm(dim=-1)

    # small next to how far data lie from their mean, sqrt(trace Cov) = sqrt(d) sigma_data
    assert gap(model.sigma_max).mean() < 0.1 * math.sqrt(model.feature_dim) * model.sigma_data
    # and, further out, it is the first-order term of the Gaussian limit
    sigma = 10 * model.sigma_max
    first_order = torch.stack([moments[label][1] @ (sigma * e - moments[label][0]) for label, e in zip(labels, eps)])
    torch.testing.assert_close(gap(sigma), first_order.norm(dim=-1) / sigma**2, rtol=0.1, atol=0)
    assert gap(sigma).mean() / gap(model.sigma_max).mean() == pytest.approx(0.1, rel=0.05)


# -------------------------------------------------------------------------------------- plugin and contract

@pytest.mark.parametrize("name, shape, num_classes", [("gmm2d", (2,), 8), ("gmm-image", (3, 16, 16), 10)])
def test_loads_through_the_plugin_manager(name, shape, num_classes):
    pm = PluginManager(load_entry_points=False)
    pm.register(plugins.analytic, name="analytic")
    registration = pm.get("model", name)
    assert registration.plugin == "analytic"
    model = registration.obj(device="cpu")
    assert isinstance(model, bench.core.denoiser.Denoiser)
    assert (model.name, model.shape, model.num_classes) == (name, shape, num_classes)
    assert (model.sigma_min, model.sigma_max) == (0.002, 80.0)
    assert isinstance(model.sigma_data, float) and 0.3 < model.sigma_data < 1.5
    assert model.feature_dim == math.prod(shape)
    x = torch.zeros(4, *shape)
    assert model(x, torch.ones(4)).shape == x.shape
    assert model.features(x).shape == (4, model.feature_dim) and model.features(x).dtype == torch.float64


def test_counting_denoiser_drives_it(gmm2d):
    labels = torch.tensor([0, 1, 2])
    denoise = bench.core.denoiser.CountingDenoiser(gmm2d, labels)
    x = torch.zeros(3, 2)
    torch.testing.assert_close(denoise(x, 0.5), gmm2d(x, torch.full((3,), 0.5), labels))
    assert denoise.nfe == 1


@pytest.mark.parametrize("bad_label", [8, -2])
def test_bad_label_is_a_value_error(gmm2d, bad_label):
    cond = torch.tensor([0, bad_label, 1])
    with pytest.raises(ValueError, match=rf"{bad_label}.*\[0, 8\)"):
        gmm2d(torch.zeros(3, 2), torch.ones(3), cond)
    with pytest.raises(ValueError, match=str(bad_label)):
        gmm2d.sample_data(3, seed=0, labels=cond)


def test_label_minus_one_means_no_label(model):
    # classifier-free guidance batches labelled and unlabelled halves: -1 must be exactly the unconditional model
    x = model.sample_data(4, seed=3) + 0.3 * torch.randn(4, *model.shape, dtype=torch.float64)
    sigma = torch.full((4,), 0.3, dtype=torch.float64)
    mixed = model(x, sigma, torch.tensor([-1, 0, -1, 1]))
    torch.testing.assert_close(mixed[[0, 2]], model(x, sigma)[[0, 2]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[[1, 3]], model(x, sigma, torch.tensor([0, 0, 1, 1]))[[1, 3]],
                               rtol=1e-12, atol=1e-12)
    assert model.sample_data(5, seed=1, labels=torch.full((5,), -1)).shape == (5, *model.shape)


def test_cond_restricts_to_the_class(gmm2d):
    # a point on mode 0, conditioned on class 4 (the opposite mode), is pulled towards mode 4
    x = gmm2d.mu[:1].clone()
    denoised = gmm2d(x, torch.tensor([1.0], dtype=torch.float64), torch.tensor([4]))
    assert denoised[0, 0] < 0 < gmm2d(x, torch.tensor([1.0], dtype=torch.float64))[0, 0]


# ---------------------------------------------------------------------------------------------- determinism

def test_loads_are_identical():
    for first, second in [(load_gmm2d(), load_gmm2d()), (load_gmm_image(), load_gmm_image())]:
        first_state, second_state = first.state_dict(), second.state_dict()
        assert first_state.keys() == second_state.keys()
        assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert not torch.equal(load_gmm_image(seed=1).mu, load_gmm_image().mu)


def test_image_parameters_are_well_formed(gmm_image):
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(gmm_image.Q.transpose(1, 2) @ gmm_image.Q, eye.expand(20, 8, 8))
    assert gmm_image.mu.abs().max() < 1
    assert ((gmm_image.lambdas >= 0.05) & (gmm_image.lambdas <= 0.5)).all()
    assert ((gmm_image.c >= 1e-3) & (gmm_image.c <= 1e-2)).all()
    assert gmm_image.weights.std() > 0 and gmm_image.weights.sum().item() == pytest.approx(1)
    assert all(buffer.dtype == torch.float64 for name, buffer in gmm_image.named_buffers() if name != "component_class")


def test_sample_data_is_deterministic_in_seed(model):
    labels = random_labels(model, 16, seed=13)
    assert torch.equal(model.sample_data(16, seed=0), model.sample_data(16, seed=0))
    assert torch.equal(model.sample_data(16, seed=0, labels=labels), model.sample_data(16, seed=0, labels=labels))
    assert not torch.equal(model.sample_data(16, seed=0), model.sample_data(16, seed=1))
    assert model.sample_data(16, seed=0).shape == (16, *model.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model):
    cuda_model = (load_gmm2d if model.name == "gmm2d" else load_gmm_image)(device="cuda")
    sigma = sigma_batch("mixed", 32)
    x = noised_data(model, sigma, seed=14)
    cond = random_labels(model, 32, seed=15)
    torch.testing.assert_close(cuda_model(x.cuda(), sigma.cuda(), cond.cuda()).cpu(), model(x, sigma, cond),
                               rtol=1e-10, atol=1e-10)
    assert cuda_model.sample_data(4, seed=0).device.type == "cuda"
