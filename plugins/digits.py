"""digits: a small class-conditional diffusion model of scikit-learn's 8x8 handwritten digits, and the feature
network that measures its samples. Both are trained by the project (`samplerbench train digits`) and shipped in
pretrained/ with their sha256 and recipe.

The data. scikit-learn's bundled digits (UCI optical recognition; no download): 1,797 images of 8x8 pixels, each
pixel an integer level 0..16, labels 0..9. A pixel becomes x = level / 8 - 1, in [-1, 1]; an image is [1, 8, 8].
A fixed split: a permutation of the 1,797 indices drawn with seed 0 (torch.randperm, CPU generator); its first
1,500 images train both networks and are the real data of FID, precision and recall (`sample_data`); its last 297
are held out (`held_out_data`): the classifier's accuracy and the "real vs real" FID floor are measured on them.

The denoiser. EDM's preconditioning (Karras et al. 2022, Table 1) around a small UNet F:

    D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), c)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)        c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)               c_noise = log(sigma) / 4

sigma_data = 0.752, the standard deviation of the training pixels (all 1,500 x 64 values; their mean is -0.39, so
the data are not the zero-mean, std-0.5 images EDM's default assumes). F sees 8x8 and 4x4 feature maps (GroupNorm,
SiLU, residual blocks with skip connections), a Fourier embedding of c_noise and a learned class embedding of
11 entries: the 10 digits and a last one that means "no label" (label -1), trained by dropping labels with
probability 0.1, so that one network is both the conditional and the unconditional model classifier-free guidance
needs.

Training (`train_recipe`): EDM's loss with log-normal sigma (P_mean = -1.2, P_std = 1.2), Adam, a learning-rate
warm-up and an EMA of the weights, which is what ships; seeded, and deterministic given the seed and the thread
count on the CPU. The defaults (8,000 steps of 128 images, after 2,000 classifier steps) take about 13 minutes on
one CPU core; the manifest records the measured time, loss and evaluation.

The feature network. A small CNN classifier on the same [-1, 1] inputs, trained on the 1,500 training images with
random shifts of up to one pixel. Its penultimate layer (64 numbers after SiLU) is the feature space of fid, kid,
precision and recall for digits. It is registered with torch-fidelity as the feature extractor
"samplerbench-digits", and `DigitsDenoiser.features` computes features through an instance that torch-fidelity's
own `create_feature_extractor` builds, so the numbers come from torch-fidelity's code path.

Quantisation. torch-fidelity feeds extractors uint8 images. Samples are judged at the data's own precision, as
8-bit images are for natural-image FID: a sample x is rounded to the nearest of the 17 grey levels, level =
round((x + 1) * 8) clipped to 0..16, and the level is written on the 0..255 scale as (level * 255 + 8) // 16. The
extractor inverts that exactly, level = (pixel * 16 + 127) // 255, so real images reach the classifier as exactly
the values it was trained on. Real and generated data take the same path.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from bench.adapters.checkpoints import load_verified, manifest_entry, pretrained_dir, read_manifest, record_evaluation, \
    save_checkpoint, tensor_sha256
from bench.errors import BenchError
from bench.core.guidance import NO_LABEL
from bench.hookspecs import hookimpl
from bench.measure.metrics import REFERENCE_DATA_SEED, Metric, MetricContext

MODEL_NAME = "digits"
CLASSIFIER_NAME = "digits-classifier"  # the checkpoint of the feature network
FEATURE_EXTRACTOR_NAME = "samplerbench-digits"  # its name in torch-fidelity's registry
RECIPE = "samplerbench train digits"

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
MAX_LEVEL = 16  # pixels of the digits are integer grey levels 0..16
NUM_HELD_OUT = 297
SPLIT_SEED = 0
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SIGMA_DATA = 0.752  # std of the 1,500 training images' pixels in [-1, 1]; tests/test_digits.py recomputes it
FEATURE_DIM = 64  # the classifier's penultimate layer: the feature space of fid / kid / precision / recall


# ------------------------------------------------------------------------------------------------------ data

class DigitsSplit(NamedTuple):
    train_images: Tensor  # [1500, 1, 8, 8] float32 in [-1, 1]
    train_labels: Tensor  # [1500] int64
    held_out_images: Tensor  # [297, 1, 8, 8]
    held_out_labels: Tensor  # [297]


@functools.cache
def digits_split() -> DigitsSplit:
    """The fixed split of scikit-learn's digits (see the module docstring); computed once per process."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: read from its package, never downloaded

    digits = load_digits()
    levels = torch.from_numpy(digits.images).to(torch.float32)  # [1797, 8, 8], integer levels 0..16
    images = (levels / 8 - 1).unsqueeze(1)  # exact in float32: multiples of 1/8
    labels = torch.from_numpy(digits.target).to(torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held_out = order[:-NUM_HELD_OUT], order[-NUM_HELD_OUT:]
    return DigitsSplit(images[train], labels[train], images[held_out], labels[held_out])


def training_data_sha256() -> str:
    """The fingerprint the manifest records: sha256 of the training images (float32, C order), then labels
    (int64). A model trained on other data (another split, another scikit-learn) does not match it."""
    split = digits_split()
    return tensor_sha256(split.train_images, split.train_labels)


def draw_training_images(n: int, seed: int, labels: Tensor | None = None) -> Tensor:
    """n training images [n, 1, 8, 8], a pure function of (n, seed, labels).

    Without labels: n distinct images when n <= 1,500, else with replacement. With labels: image i is of class
    labels[i] (-1: any class), drawn without replacement within its class while the class has enough images.
    """
    split = digits_split()
    generator = torch.Generator().manual_seed(seed)
    requested = torch.full((n,), NO_LABEL, dtype=torch.int64) if labels is None else labels.cpu().to(torch.int64)
    if requested.shape != (n,):
        raise BenchError(f"labels must have shape [{n}] (one per image); got {list(requested.shape)}")
    chosen = torch.empty(n, dtype=torch.int64)
    for label in requested.unique().tolist():  # sorted, so the draw does not depend on the order of the labels
        if not NO_LABEL <= label < NUM_CLASSES:
            raise BenchError(f"label {label} is out of range: digits has classes 0..{NUM_CLASSES - 1} (or -1)")
        slots = (requested == label).nonzero().squeeze(1)
        pool = torch.arange(len(split.train_labels)) if label == NO_LABEL else \
            (split.train_labels == label).nonzero().squeeze(1)
        if len(slots) <= len(pool):
            picks = torch.randperm(len(pool), generator=generator)[:len(slots)]
        else:
            picks = torch.randint(len(pool), (len(slots),), generator=generator)
        chosen[slots] = pool[picks]
    return split.train_images[chosen]


# --------------------------------------------------------------------------------------------- quantisation

def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images -> uint8 pixels in torch-fidelity's 0..255 convention, through the data's 17 grey levels."""
    levels = torch.round((x.to(torch.float32) + 1) * 8).clamp(0, MAX_LEVEL).to(torch.int32)
    return ((levels * 255 + MAX_LEVEL // 2) // MAX_LEVEL).to(torch.uint8)


def from_uint8(pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of to_uint8: uint8 pixels -> the nearest grey level -> x = level / 8 - 1 in ``dtype``."""
    levels = (pixels.to(torch.int32) * MAX_LEVEL + 127) // 255
    return levels.to(dtype) / 8 - 1


# ------------------------------------------------------------------------------------ the feature network

class DigitsClassifier(nn.Module):
    """Two 3x3 conv pairs (8x8 with 32 channels, 4x4 with 64), max-pooled to 2x2, then 256 -> 64 -> 10.

    ``features`` is the 64-d penultimate layer; dropout sits after it, so evaluation (eval mode) uses all of it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM), nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class DigitsFeatureExtractor(FeatureExtractorBase):
    """The digits classifier as a torch-fidelity feature extractor: uint8 images [B, 1 or 3, 8, 8] in, features
    "64" (the penultimate layer, the default for fid / kid / prc) and "logits" out, float32.

    ``feature_extractor_weights_path``: a classifier safetensors file listed in the manifest beside it, whose
    sha256 is checked; default: the shipped pretrained/digits-classifier.safetensors. ``classifier``: a
    DigitsClassifier in memory instead (the training recipe evaluates with it before saving). Three-channel input
    (what torch-fidelity's image datasets produce) is read as grey, the mean of its channels.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 feature_extractor_internal_dtype: str | None = None, classifier: DigitsClassifier | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        vassert(feature_extractor_internal_dtype in ("float32", "float64", None),
                "Only 32 and 64 bit floats are supported for internal dtype of this feature extractor")
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        if classifier is None:
            classifier = DigitsClassifier()
            classifier.load_state_dict(_load_classifier_tensors(feature_extractor_weights_path))
        self.classifier = classifier  # given: a network fresh from training, before it is saved
        self.to(self.internal_dtype)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] in (1, 3) and tuple(x.shape[2:]) == IMAGE_SHAPE[1:],
                f"Input is not Bx1x8x8 (or Bx3x8x8): {tuple(x.shape)}")
        if x.shape[1] == 3:
            x = x.to(torch.float32).mean(dim=1, keepdim=True).round().to(torch.uint8)
        features = self.classifier.features(from_uint8(x, self.internal_dtype))
        computed = {"64": features, "logits": self.classifier.head(features)}
        return tuple(computed[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # a handful of small convolutions: compiling costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, *IMAGE_SHAPE, dtype=torch.uint8)


if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # the registry refuses a second registration
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor)


def _load_classifier_tensors(weights_path: str | Path | None) -> dict[str, Tensor]:
    if weights_path is None:
        return load_verified(CLASSIFIER_NAME, made_by=RECIPE)
    path = Path(weights_path)
    names = [name for name, entry in read_manifest(path.parent).items() if entry.get("file") == path.name]
    if not names:
        raise BenchError(f"{path} is not listed in {path.parent / 'manifest.json'}; feature-network weights are "
                         f"loaded only after their sha256 is checked against a manifest (make them with `{RECIPE}`)")
    return load_verified(names[0], path.parent, made_by=RECIPE)


def create_digits_feature_extractor(weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                                    classifier: DigitsClassifier | None = None) -> DigitsFeatureExtractor:
    """The registered extractor, built by torch-fidelity's own factory (as `calculate_metrics` builds it), from
    verified weights on disk (``weights_path``, default the shipped ones) or from a ``classifier`` in memory."""
    extra = {} if classifier is None else {"classifier": classifier}
    extractor = create_feature_extractor(FEATURE_EXTRACTOR_NAME, ["64", "logits"], cuda=False, verbose=False,
                                         feature_extractor_weights_path=None if weights_path is None
                                         else str(weights_path), **extra)
    return extractor.to(device)


# ------------------------------------------------------------------------------------------- the denoiser

class FourierEmbedding(nn.Module):
    """cos and sin of c_noise at fixed log-spaced frequencies. c_noise = log(sigma) / 4 spans about [-1.55, 1.10]
    for sigma in [0.002, 80]; frequencies from 1 to 32 radians per unit resolve it from its whole range down to a
    few percent of it, and the MLP that follows mixes them."""

    def __init__(self, num_frequencies: int = 16, lowest: float = 1.0, highest: float = 32.0) -> None:
        super().__init__()
        frequencies = torch.exp(torch.linspace(math.log(lowest), math.log(highest), num_frequencies))
        self.register_buffer("frequencies", frequencies, persistent=False)  # a constant, not a weight

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.frequencies.to(c_noise.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the embedding scales and shifts the second normalisation (FiLM, as EDM's
    adaptive scale); dropout; 3x3 conv initialised to zero, so that a fresh block is the identity."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(embedding)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class DigitsUNet(nn.Module):
    """F of the preconditioned denoiser: [B, 1, 8, 8] -> [B, 1, 8, 8], conditioned on c_noise and a class.

        8x8, 32 ch:  conv_in -> block ------------------------------------------> concat -> block -> conv_out
                                  \\ down (3x3, stride 2)            up (3x3, then nearest) /
        4x4, 64 ch:                block -> block -----------> concat -> block
                                     \\___________________________/  (skip)

    Classes 0..9 and NO_LABEL_INDEX = 10 ("no label") share one embedding table. 442,017 parameters; about 16
    MFLOP per image, so a forward pass of 512 images takes some 70 ms on two CPU cores.
    """

    NO_LABEL_INDEX = NUM_CLASSES

    def __init__(self, channels: tuple[int, int] = (32, 64), embedding_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        fine, coarse = channels
        self.noise_embedding = FourierEmbedding()
        self.noise_mlp = nn.Sequential(nn.Linear(2 * self.noise_embedding.frequencies.numel(), embedding_dim),
                                       nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, embedding_dim)
        self.conv_in = nn.Conv2d(1, fine, 3, padding=1)
        self.encode_fine = ResidualBlock(fine, fine, embedding_dim, dropout)
        self.down = nn.Conv2d(fine, coarse, 3, stride=2, padding=1)
        self.encode_coarse = ResidualBlock(coarse, coarse, embedding_dim, dropout)
        self.middle = ResidualBlock(coarse, coarse, embedding_dim, dropout)
        self.decode_coarse = ResidualBlock(2 * coarse, coarse, embedding_dim, dropout)
        self.up = nn.Conv2d(coarse, fine, 3, padding=1)
        self.decode_fine = ResidualBlock(2 * fine, fine, embedding_dim, dropout)
        self.norm_out = nn.GroupNorm(8, fine)
        self.conv_out = nn.Conv2d(fine, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # F starts at 0, so D starts as c_skip x, the best guess knowing nothing
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_index: Tensor) -> Tensor:
        embedding = F.silu(self.noise_mlp(self.noise_embedding(c_noise)) + self.class_embedding(class_index))
        fine = self.encode_fine(self.conv_in(x), embedding)
        coarse = self.encode_coarse(self.down(fine), embedding)
        h = self.middle(coarse, embedding)
        h = self.decode_coarse(torch.cat([h, coarse], dim=1), embedding)
        h = F.interpolate(self.up(h), scale_factor=2, mode="nearest")  # the conv at 4x4 costs a quarter of one at 8x8
        h = self.decode_fine(torch.cat([h, fine], dim=1), embedding)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsDenoiser(nn.Module):
    """The digits model as a Denoiser: EDM-preconditioned DigitsUNet, its real data and its feature space.

    Precision: the skip path c_skip * x and the returned estimate are in x's dtype (float64 input keeps float64
    there); the network computes in its weights' dtype (float32 as shipped). The preconditioning coefficients are
    computed in x's dtype.
    """

    name = MODEL_NAME
    shape = IMAGE_SHAPE
    num_classes = NUM_CLASSES
    sigma_min = SIGMA_MIN
    sigma_max = SIGMA_MAX
    sigma_data = SIGMA_DATA

    def __init__(self, network: DigitsUNet, extractor: DigitsFeatureExtractor | None = None,
                 content_hash: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.extractor = extractor
        self.content_hash = content_hash  # keys cached reference statistics; see load_digits_model

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None and cond.device.type == "cpu":  # on an accelerator this check would sync
            _check_labels(cond, x.shape[0])
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        sigma_data = self.sigma_data
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
        c_noise = sigma.log() / 4
        network_dtype = self.network.conv_in.weight.dtype
        F_x = self.network((c_in * x).to(network_dtype), c_noise.flatten().to(network_dtype), class_index(cond, x))
        return c_skip * x + c_out * F_x.to(x.dtype)

    # --------------------------------------------------------------------------- data and feature space

    def sample_data(self, n: int, seed: int, labels: Tensor | None = None) -> Tensor:
        """n real training images [n, 1, 8, 8] float32 in [-1, 1], on the model's device (see
        draw_training_images): the reference data of fid, precision and recall."""
        return draw_training_images(n, seed, labels).to(self.network.conv_in.weight.device)

    def held_out_data(self) -> tuple[Tensor, Tensor]:
        """The 297 held-out images [297, 1, 8, 8] and their labels [297], never seen in training."""
        split = digits_split()
        device = self.network.conv_in.weight.device
        return split.held_out_images.to(device), split.held_out_labels.to(device)

    def _extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.extractor is None:
            raise BenchError("this digits model was built without its feature network (load it with "
                             "load_digits_model / bench.load_model('digits'))")
        with torch.inference_mode():
            return self.extractor(to_uint8(x).to(next(self.extractor.parameters()).device))

    def features(self, x: Tensor) -> Tensor:
        """[n, 64] float32: x quantised to uint8 pixels, through torch-fidelity's "samplerbench-digits"."""
        return self._extract(x)[0]

    def classify(self, x: Tensor) -> Tensor:
        """[n, 10] logits of the feature network, on the same quantised pixels as `features`."""
        return self._extract(x)[1]

    def extra_repr(self) -> str:
        parameters = sum(p.numel() for p in self.network.parameters())
        return f"name={self.name!r}, parameters={parameters}, sigma_data={self.sigma_data}"


def class_index(cond: Tensor | None, x: Tensor) -> Tensor:
    """Labels -> rows of the class embedding: -1 ("no label") and None (unconditional) -> NO_LABEL_INDEX."""
    if cond is None:
        return torch.full((x.shape[0],), DigitsUNet.NO_LABEL_INDEX, dtype=torch.int64, device=x.device)
    cond = cond.to(device=x.device, dtype=torch.int64)
    return torch.where(cond == NO_LABEL, DigitsUNet.NO_LABEL_INDEX, cond)


def _check_labels(labels: Tensor, batch: int) -> None:
    if labels.shape != (batch,):
        raise ValueError(f"cond must hold one class label per sample, shape ({batch},); got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"cond must hold integer class labels; got dtype {labels.dtype}")
    bad = labels[(labels < NO_LABEL) | (labels >= NUM_CLASSES)]
    if bad.numel() > 0:
        raise ValueError(f"class label {int(bad[0])} is out of range for model 'digits': labels must lie in "
                         f"[0, {NUM_CLASSES}), or be -1 for no label")


def load_digits_model(device: str | torch.device = "cpu", directory: str | Path | None = None) -> DigitsDenoiser:
    """The shipped digits model with its feature network, both sha256-verified against the manifest.

    ``directory``: where the checkpoints and manifest are (default: $SAMPLERBENCH_PRETRAINED or pretrained/).
    ``content_hash`` covers both checkpoints: cached real-data features depend on the classifier, reference ODE
    solutions on the denoiser.
    """
    directory = Path(directory or pretrained_dir())
    network = DigitsUNet()
    network.load_state_dict(load_verified(MODEL_NAME, directory, made_by=RECIPE))
    model_entry = manifest_entry(MODEL_NAME, directory, RECIPE)
    if model_entry.get("data_sha256") != training_data_sha256():
        raise BenchError(f"the digits model in {directory} was trained on other data (data_sha256 "
                         f"{model_entry.get('data_sha256')}) than this machine's split of scikit-learn's digits "
                         f"({training_data_sha256()}); its real-data statistics would not match; run `{RECIPE}`")
    classifier_entry = manifest_entry(CLASSIFIER_NAME, directory, RECIPE)
    extractor = create_digits_feature_extractor(directory / classifier_entry["file"], device)
    content_hash = hashlib.sha256(f"{model_entry['sha256']}:{classifier_entry['sha256']}".encode()).hexdigest()
    model = DigitsDenoiser(network, extractor, content_hash).to(device)
    model.checkpoint_sha256 = model_entry["sha256"]
    model.classifier_sha256 = classifier_entry["sha256"]
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- training

def shift_augment(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, the border filled with background (-1)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(8)  # [B, 8] rows of the padded image to keep
    cols = offsets[:, 1, None] + torch.arange(8)
    batch = torch.arange(len(images))[:, None, None]
    return padded[:, 0][batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of an endless stream of minibatches: a fresh seeded permutation every epoch, as a seeded
    DataLoader with shuffle and drop_last would give, without its worker machinery."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def train_classifier(steps: int, seed: int, device: str | torch.device = "cpu", batch_size: int = 128,
                     learning_rate: float = 1e-3, log_every: int = 500) -> tuple[DigitsClassifier, dict]:
    """The feature network: Adam on cross-entropy over shifted training images; returns it (eval mode) and a
    record of its training."""
    split = digits_split()
    images, labels = split.train_images, split.train_labels  # minibatches are made on the CPU, then moved
    torch.manual_seed(seed)  # initialisation and dropout
    order_generator = torch.Generator().manual_seed(seed)  # batch order and shifts
    classifier = DigitsClassifier().to(device).train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate, foreach=True)
    losses, started = [], time.perf_counter()
    for step, batch in zip(range(steps), minibatches(len(images), batch_size, order_generator)):
        inputs = shift_augment(images[batch], order_generator).to(device)
        loss = F.cross_entropy(classifier(inputs), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"classifier step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    seconds = time.perf_counter() - started
    tail = losses[-max(1, steps // 10):]
    record = {"loss": sum(tail) / len(tail), "loss_window": f"mean cross-entropy of the last {len(tail)} steps",
              "seconds": round(seconds, 1), "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
              "parameters": sum(p.numel() for p in classifier.parameters())}
    return classifier.eval(), record


def edm_loss(denoiser: DigitsDenoiser, images: Tensor, labels: Tensor, P_mean: float = -1.2,
             P_std: float = 1.2) -> Tensor:
    """EDM's loss (Karras et al. 2022, Eq. 8 and Table 1): log-normal sigma, weight lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which makes the network's effective target unit-variance at
    every sigma. Returns the per-sample loss [B]."""
    sigma = torch.exp(torch.randn(images.shape[0], device=images.device) * P_std + P_mean)
    weight = (sigma ** 2 + denoiser.sigma_data ** 2) / (sigma * denoiser.sigma_data) ** 2
    noisy = images + torch.randn_like(images) * sigma[:, None, None, None]
    denoised = denoiser(noisy, sigma, labels)
    return weight * (denoised - images).square().flatten(1).sum(1)


def train_denoiser(steps: int, seed: int, device: str | torch.device = "cpu", batch_size: int = 128,
                   learning_rate: float = 2e-3, warmup_steps: int = 200, label_dropout: float = 0.1,
                   ema_halflife_images: float = 100_000, ema_rampup_ratio: float = 0.05,
                   log_every: int = 500) -> tuple[DigitsUNet, dict]:
    """EDM's training loop, on the digits: returns the EMA of the weights (the network that ships) and a record.

    Each step: a minibatch of training images and labels; each label replaced by "no label" with probability
    ``label_dropout`` (classifier-free guidance's unconditional model); EDM's loss; Adam with a linear learning
    rate warm-up; then the EMA, whose half-life (in images seen) ramps up with training as in EDM's
    training_loop.py: min(halflife, images seen * ramp-up ratio).
    """
    split = digits_split()
    images, labels = split.train_images.to(device), split.train_labels.to(device)
    torch.manual_seed(seed)  # initialisation, dropout, sigma, noise and label dropout all draw from it
    order_generator = torch.Generator().manual_seed(seed)
    network = DigitsUNet().to(device).train()
    ema = DigitsUNet().to(device).eval().requires_grad_(False)
    ema.load_state_dict(network.state_dict())
    denoiser = DigitsDenoiser(network)
    # foreach: one kernel per step for all parameters; the default on the CPU loops over them, slowly
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    losses, started = [], time.perf_counter()
    for step, batch in zip(range(steps), minibatches(len(images), batch_size, order_generator)):
        batch = batch.to(device)
        batch_labels = labels[batch]
        dropped = torch.rand(batch_size, device=device) < label_dropout
        batch_labels = torch.where(dropped, torch.full_like(batch_labels, NO_LABEL), batch_labels)
        loss = edm_loss(denoiser, images[batch], batch_labels).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, (step + 1) / warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        images_seen = (step + 1) * batch_size
        halflife = min(ema_halflife_images, images_seen * ema_rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), network.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - started
            print(f"denoiser step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({elapsed:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    tail = losses[-max(1, steps // 10):]
    record = {"loss": sum(tail) / len(tail),
              "loss_window": f"mean EDM loss (per image, summed over pixels) of the last {len(tail)} steps",
              "seconds": round(seconds, 1), "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
              "warmup_steps": warmup_steps, "label_dropout": label_dropout,
              "ema_halflife_images": ema_halflife_images, "ema_rampup_ratio": ema_rampup_ratio,
              "P_mean": -1.2, "P_std": 1.2, "sigma_data": SIGMA_DATA,
              "parameters": sum(p.numel() for p in network.parameters())}
    return ema, record


# ------------------------------------------------------------------------------------------- evaluation

def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """torch-fidelity's FID between two sets of features (as plugins/metrics.py computes it)."""
    statistics = [fid_features_to_statistics(f.to("cpu", torch.float64)) for f in (features_a, features_b)]
    return float(fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID])


def evaluate_classifier(model: DigitsDenoiser) -> dict:
    """Held-out accuracy, and the FID floor: held-out real digits vs as many training digits."""
    held_out_images, held_out_labels = model.held_out_data()
    accuracy = (model.classify(held_out_images).argmax(1) == held_out_labels).double().mean().item()
    train = model.sample_data(NUM_HELD_OUT, seed=REFERENCE_DATA_SEED)
    split = digits_split()
    train_accuracy = (model.classify(split.train_images).argmax(1) == split.train_labels).double().mean().item()
    return {"held_out_accuracy": accuracy, "held_out_errors": round((1 - accuracy) * NUM_HELD_OUT),
            "train_accuracy": train_accuracy, "feature_dim": FEATURE_DIM,
            "fid_held_out_vs_train_n297": frechet_distance(model.features(held_out_images), model.features(train))}


def evaluate_denoiser(model: DigitsDenoiser, nfe: int = 35, seed: int = 0,
                      guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)) -> dict:
    """The model's samples (Heun, karras schedule, NFE ``nfe``) next to the held-out digits, like for like.

    At N = 297 FID moves by several points with the class make-up of the two sets (two disjoint draws of 297
    training digits are 26 apart), so every comparison holds it fixed: conditional samples are drawn for the
    held-out digits' own labels, and both they and the held-out digits are compared with one draw of training
    digits of those same labels. Unconditional samples (label -1) are compared with a draw of any training digits,
    next to the held-out digits against that same draw. Class accuracy: how often the feature network reads a
    conditional sample as its label, at each classifier-free guidance scale.
    """
    import bench  # the harness's own sampler, as a benchmark would call it

    n = NUM_HELD_OUT
    held_out_images, held_out_labels = model.held_out_data()
    held_out_labels = held_out_labels.cpu()
    train_same_labels = model.features(model.sample_data(n, seed=REFERENCE_DATA_SEED, labels=held_out_labels))
    train_any = model.features(model.sample_data(n, seed=REFERENCE_DATA_SEED))
    held_out = model.features(held_out_images)

    def draw(labels: Tensor | None, guidance: float = 0.0) -> Tensor:
        return bench.sample(model, "heun", nfe=nfe, n=n, seed=seed, schedule="karras", labels=labels,
                            guidance=guidance or None).x

    samples_by_guidance = {w: draw(held_out_labels, w) for w in guidance_scales}
    conditional = samples_by_guidance[0.0] if 0.0 in samples_by_guidance else draw(held_out_labels)
    unconditional = draw(None)
    evaluation = {
        "sampler": f"heun, karras schedule, NFE {nfe}, seed {seed}, N {n}, float32; conditional samples drawn for "
                   "the held-out digits' labels",
        "fid_conditional_samples_vs_train_n297": frechet_distance(model.features(conditional), train_same_labels),
        "fid_held_out_vs_train_n297": frechet_distance(held_out, train_same_labels),
        "fid_unconditional_samples_vs_train_n297": frechet_distance(model.features(unconditional), train_any),
        "fid_held_out_vs_any_train_n297": frechet_distance(held_out, train_any),
    }
    for w, samples in samples_by_guidance.items():
        predicted = model.classify(samples).argmax(1).cpu()
        evaluation[f"class_accuracy_guidance_{w:g}"] = (predicted == held_out_labels).double().mean().item()
    return evaluation


# ----------------------------------------------------------------------------------------------- recipe

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=RECIPE, description="Train the digits feature network (classifier), "
                                     "then the diffusion model; evaluate both and save them to pretrained/.")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise (default 0)")
    parser.add_argument("--steps", type=int, default=8000, help="diffusion-model training steps (default 8000)")
    parser.add_argument("--batch-size", type=int, default=128, help="diffusion-model batch size (default 128)")
    parser.add_argument("--classifier-steps", type=int, default=2000, help="classifier training steps (default 2000)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice, one per "
                        "core); on a machine shared with other jobs, 1 avoids oversubscribing the cores, which can "
                        "slow training tenfold")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: $SAMPLERBENCH_PRETRAINED or "
                                                    "the repository's pretrained/)")
    parser.add_argument("--only", choices=["classifier", "model"],
                        help="train one network only; `model` evaluates with the classifier already in --out")
    parser.add_argument("--evaluate", action="store_true",
                        help="train nothing: measure the checkpoints already in --out again (after a change to the "
                             "evaluation) and rewrite the digits model's evaluation in the manifest")
    return parser


def train_recipe(argv: list[str]) -> None:
    """`samplerbench train digits [--seed S] [--steps N] [--batch-size B] [--classifier-steps M] [--device D]
    [--threads T] [--out DIR] [--only classifier|model] [--evaluate]`: trains the feature network, then the
    diffusion model (evaluated with it), and saves each with its recipe, training record and evaluation; with
    --evaluate, only measures the saved model again."""
    options = _parser().parse_args(argv)
    out = Path(options.out) if options.out else pretrained_dir()
    if options.evaluate:
        if options.threads:
            torch.set_num_threads(options.threads)
        evaluation = evaluate_denoiser(load_digits_model(directory=out))
        record_evaluation(MODEL_NAME, evaluation, f"{RECIPE} --evaluate", out)
        print(", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in evaluation.items()), flush=True)
        return
    # the recipe's arguments as recorded: every option resolved, the output location left out (it is not an input)
    arguments = ["--seed", str(options.seed), "--steps", str(options.steps), "--batch-size", str(options.batch_size),
                 "--classifier-steps", str(options.classifier_steps), "--device", options.device]
    if options.threads:
        torch.set_num_threads(options.threads)
        arguments += ["--threads", str(options.threads)]
    if options.only:
        arguments += ["--only", options.only]
    data_sha256 = training_data_sha256()
    # where it ran, and how busy the machine was: wall times on a shared machine say little without it
    where = {"device": str(options.device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "load_average_1min_at_start": round(os.getloadavg()[0], 2), "torch": torch.__version__,
             "machine": platform.machine()}

    if options.only != "model":
        print(f"training the feature network ({options.classifier_steps} steps) on {options.device}", flush=True)
        classifier, record = train_classifier(options.classifier_steps, options.seed, options.device)
        evaluation = evaluate_classifier(_in_memory_model(DigitsUNet(), classifier))
        print(f"classifier: held-out accuracy {evaluation['held_out_accuracy']:.4f}, FID(held-out vs train, "
              f"N={NUM_HELD_OUT}) {evaluation['fid_held_out_vs_train_n297']:.3f}", flush=True)
        save_checkpoint(CLASSIFIER_NAME, classifier.state_dict(), RECIPE, arguments, data_sha256, {**record, **where},
                        evaluation, out)
    if options.only == "classifier":
        print(f"saved {out / (CLASSIFIER_NAME + '.safetensors')}; the digits model's recorded evaluation used the "
              f"previous feature network: rerun `{RECIPE} --only model` to refresh it")
        return

    classifier = DigitsClassifier()
    classifier.load_state_dict(load_verified(CLASSIFIER_NAME, out, made_by=RECIPE))
    print(f"training the diffusion model ({options.steps} steps, batch {options.batch_size}) on {options.device}",
          flush=True)
    network, record = train_denoiser(options.steps, options.seed, options.device, batch_size=options.batch_size)
    model = _in_memory_model(network.cpu(), classifier)
    evaluation = evaluate_denoiser(model)
    print(", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in evaluation.items()), flush=True)
    entry = save_checkpoint(MODEL_NAME, network.state_dict(), RECIPE, arguments, data_sha256, {**record, **where},
                            evaluation, out)
    print(f"saved {out / entry['file']} (sha256 {entry['sha256']})", flush=True)


def _in_memory_model(network: DigitsUNet, classifier: DigitsClassifier) -> DigitsDenoiser:
    """A DigitsDenoiser around freshly trained networks, before they are saved, on the CPU."""
    extractor = create_digits_feature_extractor(classifier=classifier.cpu())
    return DigitsDenoiser(network.cpu(), extractor).eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------- the metric

def class_accuracy(context: MetricContext) -> float | None:
    """The share of samples the feature network classifies as the label they were drawn for; None when the cell
    has no labels or the model no classifier. Samples drawn with label -1 ("no label") are left out."""
    if context.labels is None or not hasattr(context.model, "classify"):
        return None
    labels = context.labels.cpu()
    asked = labels != NO_LABEL
    if not bool(asked.any()):
        return None
    predicted = context.memo("classify", lambda: context.model.classify(context.samples)).argmax(1).cpu()
    return (predicted[asked] == labels[asked]).double().mean().item()


@hookimpl
def register_models(register):
    register(load_digits_model, name=MODEL_NAME, train=train_recipe)


@hookimpl
def register_metrics(register):
    register(Metric(class_accuracy, "higher", "share of samples the digits classifier reads as their label"),
             name="class_accuracy")
