"""The digits model as the harness sees it: EDM's preconditioning around the UNet, the guidance convention for
labels, and `load_digits_model`, the loader registered as model "digits".

EDM's preconditioning (Karras et al. 2022, Table 1) turns the network F (networks.DigitsUNet) into a denoiser D
whose inputs and training targets have unit variance at every noise level:

    D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), c)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)        c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)               c_noise = log(sigma) / 4

sigma_data = 0.752, the standard deviation of the training pixels (all 1,500 x 64 values; their mean is -0.39, so
the data are not the zero-mean, std-0.5 images EDM's default assumes).

Labels. ``cond`` holds one class per sample, 0..9, or -1 (bench.core.guidance.NO_LABEL) for "no label"; None means
no label for the whole batch. The network was trained with labels dropped to "no label" one time in ten, so the
same network is both the conditional and the unconditional model that classifier-free guidance combines.

The model also carries its data and its feature space (`sample_data`, `held_out_data`, `features`, `classify`),
which the harness's fid, kid, precision, recall and class_accuracy use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.core.guidance import NO_LABEL
from bench.errors import BenchError

from .data import IMAGE_SHAPE, NUM_CLASSES, digits_split, draw_training_images, to_uint8, training_data_sha256
from .features import DigitsFeatureExtractor, create_digits_feature_extractor
from .networks import DigitsUNet
from .weights import MODEL_NAME, RECIPE, load_classifier, load_unet

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SIGMA_DATA = 0.752  # std of the 1,500 training images' pixels in [-1, 1]; tests/test_digits.py recomputes it


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
                 checkpoint_sha256: str | None = None, classifier_sha256: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.extractor = extractor
        # sha256 of the checkpoint files the two networks were loaded from; None for networks built in memory
        self.checkpoint_sha256 = checkpoint_sha256
        self.classifier_sha256 = classifier_sha256

    @property
    def content_hash(self) -> str | None:
        """What the harness keys cached results of this model by: both checkpoints' sha256, since cached real-data
        features depend on the classifier and reference ODE solutions on the denoiser. None in memory."""
        if self.checkpoint_sha256 is None or self.classifier_sha256 is None:
            return None
        return hashlib.sha256(f"{self.checkpoint_sha256}:{self.classifier_sha256}".encode()).hexdigest()

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
    """The shipped digits model with its feature network, both checked against the manifest (weights.py).

    ``directory``: where the checkpoints and manifest are (default: $SAMPLERBENCH_PRETRAINED, else the shipped
    pretrained/). The model's ``checkpoint_sha256`` and ``classifier_sha256`` are the hashes of the bytes that were
    checked and loaded, and its ``content_hash`` is made from them.
    """
    network, checkpoint = load_unet(directory)
    data_sha256 = checkpoint.entry.get("data_sha256")
    if data_sha256 != training_data_sha256():
        raise BenchError(f"the digits model {checkpoint.path} was trained on other data (data_sha256 "
                         f"{data_sha256!r:.80}) than this machine's split of scikit-learn's digits "
                         f"({training_data_sha256()}); its real-data statistics would not match; run `{RECIPE}`")
    classifier, classifier_checkpoint = load_classifier(directory)
    extractor = create_digits_feature_extractor(device=device, classifier=classifier)
    model = DigitsDenoiser(network, extractor, checkpoint.sha256, classifier_checkpoint.sha256)
    return model.to(device).eval().requires_grad_(False)
