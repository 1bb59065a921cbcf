"""The digits data: scikit-learn's bundled 8x8 handwritten digits, the fixed split every part of the plugin uses, and
the mapping between their grey levels, the model's [-1, 1] pixels and torch-fidelity's uint8 images.

The images. scikit-learn's ``load_digits`` (UCI optical recognition of handwritten digits) ships inside the
scikit-learn package, so nothing is downloaded: 1,797 images of 8x8 pixels, each pixel an integer grey level 0..16,
labels 0..9. A level becomes x = level / 8 - 1, in [-1, 1], exactly representable in float32; an image is [1, 8, 8].

The split. One permutation of the 1,797 indices, drawn with seed 0 (torch.randperm on a CPU generator). Its first
1,500 images train both networks and are the real data of FID, precision and recall (`draw_training_images`); its
last 297 are held out: the classifier's accuracy and the "real vs real" FID floor are measured on them. The sha256
of the training images and labels (`training_data_sha256`) is recorded with each checkpoint, so a model trained on
other data (another split, another scikit-learn) is recognised.

Quantisation. torch-fidelity feeds feature extractors uint8 images. Samples are judged at the data's own precision,
as 8-bit images are for natural-image FID: a sample x is rounded to the nearest of the 17 grey levels, level =
round((x + 1) * 8) clipped to 0..16, and the level is written on the 0..255 scale as (level * 255 + 8) // 16
(`to_uint8`). `from_uint8` inverts that exactly, level = (pixel * 16 + 127) // 255, so real images reach the
classifier as exactly the values it was trained on. Real and generated images take the same path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from bench.adapters.checkpoints import tensor_sha256
from bench.core.guidance import NO_LABEL
from bench.errors import BenchError

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
MAX_LEVEL = 16  # pixels of the digits are integer grey levels 0..16
NUM_HELD_OUT = 297
SPLIT_SEED = 0


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


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images -> uint8 pixels in torch-fidelity's 0..255 convention, through the data's 17 grey levels."""
    levels = torch.round((x.to(torch.float32) + 1) * 8).clamp(0, MAX_LEVEL).to(torch.int32)
    return ((levels * 255 + MAX_LEVEL // 2) // MAX_LEVEL).to(torch.uint8)


def from_uint8(pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of to_uint8: uint8 pixels -> the nearest grey level -> x = level / 8 - 1 in ``dtype``."""
    levels = (pixels.to(torch.int32) * MAX_LEVEL + 127) // 255
    return levels.to(dtype) / 8 - 1
