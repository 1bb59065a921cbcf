"""diffusers models in the sigma parametrization: a VP network seen as a denoiser D(x; sigma).

diffusers' DDPM-family models are variance-preserving (VP): trained on x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps at
integer timesteps t = 0 .. T-1, with a_t = alphas_cumprod[t], the scheduler's cumulative product of 1 - beta.
Dividing by sqrt(a_t) gives the variance-exploding (VE) state every solver here integrates,

    x = x_vp / sqrt(a_t) = x0 + sigma_t eps,        sigma_t = sqrt((1 - a_t) / a_t),   a_t = 1 / (1 + sigma_t^2),

so a VE state at sigma goes into the network as x_vp = x / sqrt(1 + sigma^2), at the training timestep whose sigma
it is. The training grid sigmas_discrete[t] = sqrt((1 - a_t) / a_t) increases with t; its ends are the model's
sigma_min and sigma_max. A sigma between two grid points maps to a fractional timestep, linear in log sigma
(k-diffusion's DiscreteSchedule.sigma_to_t): the UNet's sinusoidal time embedding takes real timesteps.

The network's output becomes x0 according to the scheduler's ``prediction_type`` (c = 1 / sqrt(1 + sigma^2), so
that sqrt(a) = c and sqrt(1 - a) = sigma c):

    "epsilon":       x0 = x - sigma * eps                               (x = x0 + sigma eps)
    "v_prediction":  x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v
                     (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans and Ho 2022; then
                      sqrt(a) x_vp - sqrt(1 - a) v = a x0 + (1 - a) x0 = x0, and sqrt(a) x_vp = c^2 x)
    "sample":        x0 = the output

The timestep the network sees is the exact (fractional) one of sigma, unless ``timestep_rounding="round"``: then the
nearest integer, as diffusers' multistep schedulers (DPMSolverMultistep, UniPC, DEIS...) feed it with
use_karras_sigmas=True, where they step on the exact Karras sigmas but evaluate the network at
round(sigma_to_t(sigma)). With that option our dpm-solver++ on the karras schedule reproduces theirs.

    model = bench.from_diffusers(unet, scheduler)                      # in memory
    model = bench.adapters.diffusers.load_diffusers("path/to/folder")   # saved with save_pretrained; no download
    model = bench.load_model("diffusers", path="path/to/folder")       # the same, as a model plugin

diffusers is an optional dependency (``pip install samplerbench[diffusers]``): it is imported only here, and only
when a model is built or loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.errors import BenchError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_ROUNDINGS = ("none", "round")
INSTALL_HINT = "pip install samplerbench[diffusers]"

# Zero-terminal-SNR schedules (rescale_betas_zero_snr) end with alpha_cumprod = 0, an infinite sigma; that entry
# becomes the smallest positive float16 subnormal, as diffusers' EulerDiscreteScheduler does, so sigma_max is finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def import_diffusers():
    """The diffusers module, or a BenchError that says how to install it."""
    try:
        import diffusers
    except ImportError as error:
        raise BenchError(f"the diffusers adapter needs the diffusers package, which is not installed ({error}); "
                         f"install it with: {INSTALL_HINT}") from None
    return diffusers


def sigma_to_timestep(sigma: Tensor, sigmas_discrete: Tensor, log_sigmas_discrete: Tensor | None = None) -> Tensor:
    """The (fractional) training timestep of each sigma: k-diffusion's DiscreteSchedule.sigma_to_t.

    ``sigmas_discrete`` [T] is the training grid, increasing in t. A sigma on the grid gets its integer timestep
    exactly (w = 0, or w = 1 exactly at the top end), so integer timesteps reach the network bit for bit as
    diffusers passes them. Between grid points t is linear in log sigma; outside the grid it is clamped to
    [0, T - 1]. Everything stays on the device: searchsorted and gathers, no host sync, no branching on values.
    """
    if log_sigmas_discrete is None:
        log_sigmas_discrete = sigmas_discrete.log()
    sigma = sigma.contiguous()  # an expanded scalar sigma is a stride-0 view, which searchsorted would copy anyway
    # low: the last grid point with sigmas_discrete[low] <= sigma, kept where [low, low + 1] is an interval
    low = (torch.searchsorted(sigmas_discrete, sigma, right=True) - 1).clamp(0, len(sigmas_discrete) - 2)
    log_low, log_high = log_sigmas_discrete[low], log_sigmas_discrete[low + 1]
    weight = ((sigma.log() - log_low) / (log_high - log_low)).clamp(0, 1)
    return low.to(sigma.dtype) + weight


class DiffusersDenoiser(nn.Module):
    """A diffusers UNet and its training schedule as a Denoiser: D(x; sigma, cond) -> x0 (see the module docstring).

    Attributes: ``shape`` (channels, height, width), ``sigma_min`` / ``sigma_max`` (the ends of the training
    grid), ``sigma_data`` (0.5 unless given: images in [-1, 1]), ``num_classes`` (the UNet2DModel class embedding's
    ``num_class_embeds``; None otherwise), ``sigmas_discrete`` (the training grid, float64 [T], increasing in t),
    ``prediction_type``, ``timestep_rounding`` ("none": the exact fractional timestep; "round": the nearest
    integer, as diffusers' multistep schedulers with use_karras_sigmas).

    ``cond``: class labels [batch] for a class-conditional UNet2DModel; the encoder_hidden_states tensor
    [batch, tokens, dim] for a UNet2DConditionModel (text-conditional: it has no class labels, so num_classes is
    None and bench.sample's labels and guidance do not apply to it; call the denoiser directly). A UNet with
    learned variance (out_channels = 2 * in_channels) contributes its first half, the mean prediction.

    The conversion runs in the dtype of x (the timestep in at least float32, whose integers and fractions a float16
    cannot hold near t = 999); the UNet runs in its own dtype.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str, *,
                 sigma_data: float = 0.5, name: str = "diffusers", source_files: tuple[Path, ...] = (),
                 timestep_rounding: str = "none") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise BenchError(f"scheduler prediction_type {prediction_type!r} is not supported "
                             f"(supported: {', '.join(PREDICTION_TYPES)})")
        if timestep_rounding not in TIMESTEP_ROUNDINGS:
            raise BenchError(f"timestep_rounding {timestep_rounding!r} is not supported "
                             f"(supported: {', '.join(TIMESTEP_ROUNDINGS)})")
        self.timestep_rounding = timestep_rounding
        config = unet.config
        self.unet = unet
        self.name = name
        self.prediction_type = prediction_type
        self.sigma_data = float(sigma_data)
        self.in_channels = int(config.in_channels)
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (self.in_channels, int(height), int(width))
        # a UNet predicting mean and variance (DDPM++ / ADM's learned range) stacks them on channels
        self.learned_variance = int(getattr(config, "out_channels", self.in_channels) or 0) == 2 * self.in_channels
        # UNet2DConditionModel (text-conditional) declares cross_attention_dim; UNet2DModel has no such entry
        self.cross_attention = getattr(config, "cross_attention_dim", None) is not None
        self.num_classes = self._num_classes(unet)

        alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        alphas_cumprod = torch.where(alphas_cumprod > 0, alphas_cumprod, ZERO_SNR_ALPHA_CUMPROD)
        sigmas_discrete = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        if not bool((sigmas_discrete[1:] > sigmas_discrete[:-1]).all()):
            raise BenchError("the scheduler's alphas_cumprod must decrease strictly with the timestep "
                             "(sigmas_discrete must increase) for sigma -> timestep to be well defined")
        self.register_buffer("sigmas_discrete", sigmas_discrete)
        self.sigma_min = float(sigmas_discrete[0])
        self.sigma_max = float(sigmas_discrete[-1])
        self.source_files = tuple(source_files)
        self._grids: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def _num_classes(self, unet: nn.Module) -> int | None:
        config = unet.config
        num_class_embeds = getattr(config, "num_class_embeds", None)
        class_embed_type = getattr(config, "class_embed_type", None)
        if self.cross_attention:
            if getattr(unet, "class_embedding", None) is not None or getattr(config, "addition_embed_type", None):
                raise BenchError(f"{type(unet).__name__} with class or added embeddings (class_embed_type="
                                 f"{class_embed_type!r}, addition_embed_type="
                                 f"{getattr(config, 'addition_embed_type', None)!r}) is not supported: the "
                                 "adapter passes cond as encoder_hidden_states only")
            return None
        if getattr(config, "time_embedding_type", "positional") == "fourier":
            raise BenchError(f"{type(unet).__name__} with time_embedding_type='fourier' is a VE score model (NCSN++), "
                             "conditioned on sigma rather than a VP timestep; only VP (DDPM-family) UNets are "
                             "supported")
        if class_embed_type is not None:
            raise BenchError(f"{type(unet).__name__} with class_embed_type={class_embed_type!r} is not supported; "
                             "only the default class embedding (num_class_embeds with class_embed_type=None) is")
        return int(num_class_embeds) if num_class_embeds else None

    def _apply(self, *args, **kwargs):
        # .to() / .cuda() / .half() replace the buffers: the casts made from the old ones are stale
        self._grids.clear()
        return super()._apply(*args, **kwargs)

    def _grid_as(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """sigmas_discrete and its log in ``dtype``, cast once per (dtype, device) rather than on every call."""
        key = (dtype, device)
        if key not in self._grids:
            sigmas = self.sigmas_discrete.to(device=device, dtype=dtype)
            self._grids[key] = (sigmas, sigmas.log())
        return self._grids[key]

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """The model's training timestep for each sigma [batch]: exact on the grid, log-linear between."""
        dtype = torch.promote_types(sigma.dtype, torch.float32)
        sigma = sigma.to(dtype)
        sigmas, log_sigmas = self._grid_as(dtype, sigma.device)
        timestep = sigma_to_timestep(sigma, sigmas, log_sigmas)
        return timestep.round() if self.timestep_rounding == "round" else timestep

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """D(x; sigma) for x [batch, *shape] and sigma [batch]; ``cond`` as in the class docstring."""
        sigma = sigma.to(dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        timestep = self.sigma_to_timestep(sigma)
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # [batch, 1, 1, 1]: broadcasts over each sample
        c_in = (1 + sigma**2).rsqrt()  # x_vp = x / sqrt(1 + sigma^2) = sqrt(alpha_cumprod) x
        output = self.unet(x.mul(c_in).to(self.unet.dtype), timestep, **self._conditioning(cond, x)).sample
        output = output.to(x.dtype)
        if self.learned_variance:
            output = output[:, : self.in_channels]
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "v_prediction":
            return x * c_in**2 - sigma * c_in * output
        return output  # "sample"

    def _conditioning(self, cond: Tensor | None, x: Tensor) -> dict[str, Tensor]:
        if self.cross_attention:
            if cond is None:
                raise ValueError(f"{type(self.unet).__name__} is text-conditional: pass its encoder_hidden_states "
                                 "[batch, tokens, dim] as cond")
            return {"encoder_hidden_states": cond.to(device=x.device, dtype=self.unet.dtype)}
        if self.num_classes is None:
            if cond is not None:
                raise ValueError("this UNet is unconditional (no class embedding): cond must be None")
            return {}
        if cond is None:
            raise ValueError(f"this UNet is class-conditional ({self.num_classes} classes): pass labels [batch] as "
                             "cond")
        if cond.device.type == "cpu":  # on an accelerator this would sync; bench.sample checks labels up front
            self._check_labels(cond, x.shape[0])
        return {"class_labels": cond.to(x.device)}

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ValueError(f"cond must hold one class label per sample, shape ({batch},); got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"cond must hold integer class labels; got dtype {labels.dtype}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel() > 0:
            raise ValueError(f"class label {int(bad[0])} is out of range: labels must lie in [0, {self.num_classes}) "
                             "(a UNet2DModel class embedding has no 'no label' entry, so label -1 and "
                             "classifier-free guidance are not supported)")

    @functools.cached_property
    def content_hash(self) -> str | None:
        """sha256 over the configs and weights this model was loaded from (None when built in memory)."""
        return files_sha256(self.source_files)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, shape={self.shape}, prediction_type={self.prediction_type!r}, "
                f"timesteps={len(self.sigmas_discrete)}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g}, num_classes={self.num_classes}, "
                f"timestep_rounding={self.timestep_rounding!r}")


def files_sha256(paths: tuple[Path, ...]) -> str | None:
    """sha256 over the names and contents of ``paths``, in order; None for none."""
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def from_diffusers(unet: nn.Module, scheduler: Any, *, sigma_data: float = 0.5, name: str = "diffusers",
                   timestep_rounding: str = "none") -> DiffusersDenoiser:
    """Wrap a diffusers UNet (UNet2DModel or UNet2DConditionModel) and a DDPM-family scheduler as a Denoiser.

    Only the scheduler's training schedule is used: its ``alphas_cumprod`` (from betas: linear, scaled_linear,
    squaredcos_cap_v2, or trained_betas) and ``config.prediction_type``; which sampler it implements does not
    matter, solvers are chosen in the harness. The UNet is put in eval mode and shared, not copied.
    ``timestep_rounding="round"`` feeds the network integer timesteps (see the module docstring).
    """
    import_diffusers()
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, Tensor):
        raise BenchError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod: only DDPM-family (VP) "
                         "schedulers such as DDPMScheduler, DDIMScheduler or EulerDiscreteScheduler define a "
                         "training grid the adapter can use")
    config = scheduler.config
    if getattr(config, "timestep_type", "discrete") != "discrete":
        raise BenchError(f"scheduler {type(scheduler).__name__} has timestep_type={config.timestep_type!r}; "
                         "only models trained on discrete timesteps ('discrete') are supported")
    return DiffusersDenoiser(unet.eval(), alphas_cumprod, getattr(config, "prediction_type", "epsilon"),
                             sigma_data=sigma_data, name=name, timestep_rounding=timestep_rounding)


def _model_folders(path: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler folder) of a saved model: a pipeline-style folder with unet/ and scheduler/, or one
    folder holding config.json and scheduler_config.json side by side."""
    if (path / "unet" / "config.json").is_file() and (path / "scheduler" / "scheduler_config.json").is_file():
        return path / "unet", path / "scheduler"
    if (path / "config.json").is_file() and (path / "scheduler_config.json").is_file():
        return path, path
    raise BenchError(f"{str(path)!r} is not a diffusers model folder: expected unet/config.json and "
                     "scheduler/scheduler_config.json (as saved by unet.save_pretrained(DIR / 'unet') and "
                     "scheduler.save_pretrained(DIR / 'scheduler')), or config.json and scheduler_config.json in "
                     "the folder itself")


def _class_from_config(diffusers, config_file: Path, base: type, kind: str) -> type:
    class_name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise BenchError(f"{config_file}: _class_name {class_name!r} is not a diffusers {kind} class")
    return cls


def load_diffusers(path: str | Path, device: str | torch.device = "cpu", *, sigma_data: float = 0.5,
                   name: str = "diffusers", timestep_rounding: str = "none") -> nn.Module:
    """A DiffusersDenoiser from a local folder (see _model_folders for the layouts), on ``device``; a
    FlowMatchingDenoiser (bench/adapters/flow_matching.py, velocity prediction) when its scheduler is a
    flow-matching one (FlowMatchEulerDiscreteScheduler).

    Weights are read from safetensors only and with local_files_only: loading never touches the network.
    """
    diffusers = import_diffusers()
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BenchError(f"diffusers model folder {str(path)!r} does not exist")
    unet_folder, scheduler_folder = _model_folders(path)
    unet_class = _class_from_config(diffusers, unet_folder / "config.json", diffusers.ModelMixin, "model")
    scheduler_class = _class_from_config(diffusers, scheduler_folder / "scheduler_config.json",
                                         diffusers.SchedulerMixin, "scheduler")
    weights = sorted(unet_folder.glob("*.safetensors"))
    if not weights:
        raise BenchError(f"no safetensors weights in {str(unet_folder)!r}: save the UNet with "
                         "save_pretrained(..., safe_serialization=True) (the default)")
    try:
        unet = unet_class.from_pretrained(unet_folder, local_files_only=True, use_safetensors=True)
        scheduler = scheduler_class.from_pretrained(scheduler_folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise BenchError(f"could not load the diffusers model in {str(path)!r}: {error}") from None
    source_files = (unet_folder / "config.json", scheduler_folder / "scheduler_config.json", *weights)
    if getattr(scheduler, "alphas_cumprod", None) is None and hasattr(scheduler.config, "shift"):
        from bench.adapters.flow_matching import from_flow_matching

        if timestep_rounding != "none":
            raise BenchError(f"timestep_rounding={timestep_rounding!r} applies to VP models on a discrete grid; "
                             f"{type(scheduler).__name__} is a flow-matching scheduler")
        flow_model = from_flow_matching(unet, scheduler, sigma_data=sigma_data, name=name)
        flow_model.content_hash = files_sha256(source_files)
        return flow_model.to(device)
    model = from_diffusers(unet, scheduler, sigma_data=sigma_data, name=name, timestep_rounding=timestep_rounding)
    model.source_files = source_files
    return model.to(device)
