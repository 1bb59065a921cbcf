"""Analytic models: Gaussian mixtures whose exact denoiser is known in closed form.

The data are a mixture of probabilistic PCA components,

    p(x0) = sum_k w_k N(x0; mu_k, Sigma_k),    Sigma_k = Q_k diag(lambda_k) Q_k^T + c_k I,

with Q_k [d, r] orthonormal (r << d) and c_k > 0. Noising by x = x0 + sigma * eps keeps it a mixture,
p_sigma(x) = sum_k w_k N(x; mu_k, Sigma_k + sigma^2 I), and the exact denoiser is

    D(x; sigma) = E[x0 | x] = sum_k gamma_k(x) m_k(x),
    gamma_k(x)  = softmax_k(log w_k + log N(x; mu_k, Sigma_k + sigma^2 I))         (responsibilities)
    m_k(x)      = mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)               (posterior means)
                = x - sigma^2 (Sigma_k + sigma^2 I)^-1 (x - mu_k).

Sigma_k + sigma^2 I has the same eigenvectors as Sigma_k, so nothing needs a per-sigma inverse. Split
x - mu_k = Q_k z + e, with z = Q_k^T (x - mu_k) and e orthogonal to Q_k:

    (Sigma_k + sigma^2 I)^-1 (x - mu_k) = Q_k (z / (lambda_k + c_k + sigma^2)) + e / (c_k + sigma^2)
    log det(Sigma_k + sigma^2 I)        = sum log(lambda_k + c_k + sigma^2) + (d - r) log(c_k + sigma^2)

so a call costs O(batch * K * d * r). Two models are registered: "gmm2d" (8 modes on a ring) and "gmm-image"
(3x16x16 smooth images, 10 classes of 2 components). They give solvers an exact target and metrics exact
references (the data's mean and covariance, exact samples, exact log densities).
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.guidance import NO_LABEL
from bench.hookspecs import hookimpl


class _Parameters(NamedTuple):
    """The mixture's parameters cast to one dtype and device."""

    log_weights: Tensor  # [K]
    mu: Tensor  # [K, d]
    Q: Tensor  # [K, d, r]
    lambdas: Tensor  # [K, r]
    c: Tensor  # [K]
    component_class: Tensor  # [K], int64
    Q_stacked: Tensor  # [K * r, d]: every component's basis as rows, for one matrix product
    mu_projected: Tensor  # [K, r]: Q_k^T mu_k
    mu_norm_squared: Tensor  # [K]


class GaussianMixture(nn.Module):
    """A mixture of probabilistic PCA components with its exact denoiser (see the module docstring).

    Parameters are float64 buffers; a call computes in the dtype of its input (float32 or float64).
    """

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, name: str, shape: tuple[int, ...], weights: Tensor, mu: Tensor, Q: Tensor, lambdas: Tensor,
                 c: Tensor, component_class: Tensor, num_classes: int) -> None:
        super().__init__()
        num_components, d, r = Q.shape
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements but the components live in {d} dimensions")
        if not (weights > 0).all() or not (c > 0).all() or not (lambdas >= 0).all():
            raise ValueError("weights and c must be positive and lambdas non-negative")
        self.name = name
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.feature_dim = d
        float64 = dict(dtype=torch.float64)
        self.register_buffer("weights", (weights / weights.sum()).to(**float64))
        self.register_buffer("mu", mu.to(**float64))
        self.register_buffer("Q", Q.to(**float64))
        self.register_buffer("lambdas", lambdas.to(**float64))
        self.register_buffer("c", c.to(**float64))
        self.register_buffer("component_class", component_class.to(torch.int64))
        self._cast: dict[tuple[torch.dtype, torch.device], _Parameters] = {}
        self.sigma_data = self.covariance().diagonal().mean().sqrt().item()
        # names the exact distribution: caches of real-data features key on it, so a changed model never
        # reuses features drawn from the old one
        digest = hashlib.sha256()
        for buffer in (self.weights, self.mu, self.Q, self.lambdas, self.c, self.component_class):
            digest.update(buffer.cpu().contiguous().numpy().tobytes())
        self.content_hash = digest.hexdigest()

    def _apply(self, *args, **kwargs):
        # .to() / .cuda() / .double() replace the buffers: the casts made from the old ones are stale
        self._cast.clear()
        return super()._apply(*args, **kwargs)

    def _parameters_as(self, dtype: torch.dtype, device: torch.device) -> _Parameters:
        """The parameters in the compute dtype, cast once per (dtype, device) rather than on every call."""
        key = (dtype, device)
        if key not in self._cast:
            with torch.inference_mode(False):  # made while sampling, used by fits too: no inference tensors
                self._cast[key] = self._cast_parameters(dtype, device)
        return self._cast[key]

    def _cast_parameters(self, dtype: torch.dtype, device: torch.device) -> _Parameters:
        cast = dict(dtype=dtype, device=device)
        # derived in float64, then cast: the projections of the means keep their precision
        Q_stacked = self.Q.transpose(1, 2).reshape(-1, self.feature_dim)
        mu_projected = torch.einsum("kdr,kd->kr", self.Q, self.mu)
        return _Parameters(self.weights.log().to(**cast), self.mu.to(**cast), self.Q.to(**cast),
                           self.lambdas.to(**cast), self.c.to(**cast),
                           self.component_class.to(device=device), Q_stacked.to(**cast),
                           mu_projected.to(**cast), self.mu.square().sum(-1).to(**cast))

    # ----------------------------------------------------------------------------------------- the denoiser

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """D(x; sigma) = E[x0 | x0 + sigma * eps = x]. ``sigma`` [batch]; ``cond`` class labels [batch] or None.

        With a = c / (c + sigma^2) and b = (lambda + c) / (lambda + c + sigma^2), the posterior mean of component
        k is m_k = mu_k + Q_k (b_k z_k) + a_k (x - mu_k - Q_k z_k), so that
            D = (sum_k g_k a_k) x + sum_k g_k (1 - a_k) mu_k + sum_k Q_k (g_k (b_k - a_k) z_k):
        three matrix products over all components at once, the cost of a small linear network.
        """
        params = self._parameters_as(x.dtype, x.device)
        x_flat = x.reshape(x.shape[0], -1)
        log_joint, z, principal, isotropic = self._components(x_flat, sigma, cond, params)
        responsibilities = torch.softmax(log_joint, dim=-1)  # [B, K]
        isotropic_gain = params.c / isotropic  # a_k [B, K]
        principal_gain = (params.lambdas + params.c[:, None]) / principal  # b_k [B, K, r]
        weighted_z = responsibilities[..., None] * (principal_gain - isotropic_gain[..., None]) * z
        denoised = ((responsibilities * isotropic_gain).sum(-1, keepdim=True) * x_flat
                    + (responsibilities * (1 - isotropic_gain)) @ params.mu
                    + weighted_z.flatten(1) @ params.Q_stacked)
        return denoised.reshape(x.shape)

    def log_density(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """log p_sigma(x), the density of x = x0 + sigma * eps (within class ``cond`` if given); shape [batch]."""
        params = self._parameters_as(x.dtype, x.device)
        log_joint, *_ = self._components(x.reshape(x.shape[0], -1), sigma, cond, params)
        return torch.logsumexp(log_joint, dim=-1)

    def class_log_posterior(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """log p(class = labels | x; sigma), the exact noisy-class posterior: the responsibilities of the class's
        components, summed. Its gradient is what classifier guidance adds (bench.core.guidance.ClassifierGuidance)."""
        params = self._parameters_as(x.dtype, x.device)
        log_joint, *_ = self._components(x.reshape(x.shape[0], -1), sigma, None, params)
        in_class = params.component_class == labels.to(params.component_class.device)[:, None]
        return torch.logsumexp(log_joint.masked_fill(~in_class, -math.inf), -1) - torch.logsumexp(log_joint, -1)

    def _components(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None,
                    params: _Parameters) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sample and component: log w_k N(x; mu_k, Sigma_k + sigma^2 I) and z = Q_k^T (x - mu_k).

        Returns (log_joint [B, K], z [B, K, r], principal [B, K, r], isotropic [B, K]) where principal =
        lambda_k + c_k + sigma^2 and isotropic = c_k + sigma^2 are the eigenvalues of the noised covariance.
        """
        batch, d = x.shape
        num_components, r = params.lambdas.shape
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
        isotropic = params.c + sigma.square()[:, None]
        principal = params.lambdas + isotropic[..., None]
        z = (x @ params.Q_stacked.T).view(batch, num_components, r) - params.mu_projected
        # |x - mu_k|^2 expanded into matrix products; clamped, as rounding can push the orthogonal part below 0
        distance_squared = (x.square().sum(-1, keepdim=True) - 2 * x @ params.mu.T + params.mu_norm_squared)
        orthogonal_squared = (distance_squared - z.square().sum(-1)).clamp_min(0)
        mahalanobis = (z.square() / principal).sum(-1) + orthogonal_squared / isotropic
        log_det = principal.log().sum(-1) + (d - r) * isotropic.log()
        log_joint = self._log_weights(params, cond, batch) - 0.5 * (mahalanobis + log_det + d * math.log(2 * math.pi))
        return log_joint, z, principal, isotropic

    def _log_weights(self, params: _Parameters, cond: Tensor | None, batch: int) -> Tensor:
        """log w_k, [K] or [B, K]: with ``cond``, other classes get -inf, so the weights renormalise in-class.
        The label -1 stands for "no label": that sample sees the whole mixture (classifier-free guidance's
        unconditional half)."""
        if cond is None:
            return params.log_weights
        if cond.device.type == "cpu":  # on an accelerator this would sync; bench.sample checks labels up front
            self._check_labels(cond, batch)
        cond = cond.to(params.component_class.device)[:, None]
        allowed = (params.component_class == cond) | (cond == NO_LABEL)
        return torch.where(allowed, params.log_weights, -math.inf)

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ValueError(f"cond must hold one class label per sample, shape ({batch},); got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"cond must hold integer class labels; got dtype {labels.dtype}")
        bad = labels[(labels < NO_LABEL) | (labels >= self.num_classes)]
        if bad.numel() > 0:
            raise ValueError(f"class label {int(bad[0])} is out of range for model {self.name!r}: "
                             f"labels must lie in [0, {self.num_classes}), or be -1 for no label")

    # ------------------------------------------------------------------------------- the data distribution

    def _class_weights(self, label: int | None) -> Tensor:
        if label is None:
            return self.weights
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class label {label} is out of range for model {self.name!r}: "
                             f"labels must lie in [0, {self.num_classes})")
        weights = torch.where(self.component_class == label, self.weights, 0.0)
        return weights / weights.sum()

    def mean(self, label: int | None = None) -> Tensor:
        """E[x0] [d], float64: of the whole mixture, or of class ``label``."""
        return self._class_weights(label) @ self.mu

    def covariance(self, label: int | None = None) -> Tensor:
        """Cov[x0] [d, d], float64, by the law of total covariance: E_k[Sigma_k] + Cov_k[mu_k]."""
        weights = self._class_weights(label)
        centred = self.mu - weights @ self.mu
        within = torch.einsum("k,kdr,kr,ker->de", weights, self.Q, self.lambdas, self.Q)
        within = within + (weights @ self.c) * torch.eye(self.feature_dim, dtype=torch.float64, device=self.mu.device)
        between = torch.einsum("k,kd,ke->de", weights, centred, centred)
        return within + between

    def sample_data(self, n: int, seed: int, labels: Tensor | None = None) -> Tensor:
        """n exact samples of x0 [n, *shape], float64, on the model's device; a pure function of ``seed``.

        Components are drawn by weight, within class ``labels[i]`` for sample i when labels are given.
        """
        generator = torch.Generator().manual_seed(seed)
        params = self._parameters_as(torch.float64, torch.device("cpu"))
        weights = params.log_weights.exp()
        if labels is None:
            component = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            labels = labels.cpu()
            self._check_labels(labels, n)
            in_class = (params.component_class == labels[:, None]) | (labels[:, None] == NO_LABEL)
            component = torch.multinomial(weights * in_class, 1, generator=generator)[:, 0]
        num_components, d, r = params.Q.shape
        principal_noise = torch.randn(n, r, generator=generator, dtype=torch.float64)
        isotropic_noise = torch.randn(n, d, generator=generator, dtype=torch.float64)
        # scatter each sample's principal coordinates into its component's slot, then map all at once with Q
        coordinates = F.one_hot(component, num_components).to(torch.float64)[..., None] * (
            params.lambdas[component].sqrt() * principal_noise)[:, None, :]
        x0 = (params.mu[component] + torch.einsum("kdr,nkr->nd", params.Q, coordinates)
              + params.c[component].sqrt()[:, None] * isotropic_noise)
        return x0.reshape(n, *self.shape).to(self.mu.device)

    def features(self, x: Tensor) -> Tensor:
        """The analytic models' declared feature space: the raw coordinates, [n, d] float64."""
        return x.reshape(x.shape[0], -1).to(torch.float64)

    def extra_repr(self) -> str:
        num_components, d, r = self.Q.shape
        return f"name={self.name!r}, shape={self.shape}, components={num_components}, rank={r}"


# ------------------------------------------------------------------------------------------- the two models

def gmm2d() -> GaussianMixture:
    """8 equally weighted modes on the unit circle, one class each, stretched along the ring.

    Tangential variance lambda + c = 0.025 and radial variance c = 0.005: neighbouring modes are 2 sin(pi/8)
    = 0.77 apart, about 5 tangential standard deviations, so they are well separated but not point-like.
    """
    num_modes = 8
    angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    mu = torch.stack([angle.cos(), angle.sin()], dim=-1)
    tangent = torch.stack([-angle.sin(), angle.cos()], dim=-1)
    return GaussianMixture(
        name="gmm2d", shape=(2,), weights=torch.ones(num_modes, dtype=torch.float64), mu=mu, Q=tangent[..., None],
        lambdas=torch.full((num_modes, 1), 0.02, dtype=torch.float64),
        c=torch.full((num_modes,), 0.005, dtype=torch.float64),
        component_class=torch.arange(num_modes), num_classes=num_modes)


def _smooth_fields(n: int, coarse: int, generator: torch.Generator, shape: tuple[int, int, int]) -> Tensor:
    """n smooth random images [n, C*H*W] of unit RMS: Gaussian noise on a coarse grid, upsampled bicubically."""
    channels, height, width = shape
    grid = torch.randn(n, channels, coarse, coarse, generator=generator, dtype=torch.float64)
    fields = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).reshape(n, -1)
    return fields / fields.square().mean(-1, keepdim=True).sqrt()


def gmm_image(seed: int = 0) -> GaussianMixture:
    """3x16x16 images: 10 classes of 2 components, rank 8 each, unequal weights; parameters a function of seed.

    A component's mean is tanh(class pattern + 0.5 * its own variation), a smooth image in (-1, 1). Its
    principal directions are smooth too (QR of smooth fields), with variances lambda log-uniform in
    [0.05, 0.5] and an isotropic floor c log-uniform in [1e-3, 1e-2].
    """
    shape, num_classes, per_class, rank = (3, 16, 16), 10, 2, 8
    num_components = num_classes * per_class
    generator = torch.Generator().manual_seed(seed)
    class_pattern = _smooth_fields(num_classes, 4, generator, shape)
    variation = _smooth_fields(num_components, 4, generator, shape)
    component_class = torch.arange(num_components) // per_class
    mu = torch.tanh(class_pattern[component_class] + 0.5 * variation)
    directions = _smooth_fields(num_components * rank, 6, generator, shape).reshape(num_components, rank, -1)
    Q, R = torch.linalg.qr(directions.transpose(1, 2))
    # fix QR's sign freedom (positive diagonal of R), so Q does not depend on the LAPACK build
    Q = Q * R.diagonal(dim1=-2, dim2=-1).sign()[:, None, :]
    lambdas = _log_uniform((num_components, rank), 0.05, 0.5, generator).sort(dim=-1, descending=True).values
    c = _log_uniform((num_components,), 1e-3, 1e-2, generator)
    weights = 0.5 + torch.rand(num_components, generator=generator, dtype=torch.float64)
    return GaussianMixture(name="gmm-image", shape=shape, weights=weights, mu=mu, Q=Q, lambdas=lambdas, c=c,
                           component_class=component_class, num_classes=num_classes)


def _log_uniform(size: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def load_gmm2d(device: str | torch.device = "cpu") -> GaussianMixture:
    return gmm2d().to(device)


def load_gmm_image(device: str | torch.device = "cpu", seed: int = 0) -> GaussianMixture:
    return gmm_image(seed).to(device)


@hookimpl
def register_models(register):
    register(load_gmm2d, name="gmm2d")
    register(load_gmm_image, name="gmm-image")
