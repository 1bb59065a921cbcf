"""How good the digits networks are, measured the way the recipe records it in pretrained/manifest.json: the
classifier's held-out accuracy and the real-vs-real FID floor, then the diffusion model's FID and class accuracy
next to held-out real digits.

FID here is the harness's own (bench.measure.distances, the numbers every suite reports), computed in the digits
feature space (features.py) on 297 images a side: the size of the held-out set.
"""

from __future__ import annotations

from torch import Tensor

from bench.core.sampling import sample
from bench.measure.distances import feature_statistics, frechet_distance
from bench.measure.metrics import REFERENCE_DATA_SEED

from .data import NUM_HELD_OUT, digits_split
from .denoiser import DigitsDenoiser
from .networks import FEATURE_DIM


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """The Frechet distance between two sets of features, as the harness's fid metric computes it."""
    return frechet_distance(feature_statistics(features_a), feature_statistics(features_b))


def evaluate_classifier(model: DigitsDenoiser) -> dict:
    """Held-out accuracy, and the FID floor: held-out real digits vs as many training digits."""
    held_out_images, held_out_labels = model.held_out_data()
    accuracy = (model.classify(held_out_images).argmax(1) == held_out_labels).double().mean().item()
    train = model.sample_data(NUM_HELD_OUT, seed=REFERENCE_DATA_SEED)
    split = digits_split()
    train_accuracy = (model.classify(split.train_images).argmax(1) == split.train_labels).double().mean().item()
    return {"held_out_accuracy": accuracy, "held_out_errors": round((1 - accuracy) * NUM_HELD_OUT),
            "train_accuracy": train_accuracy, "feature_dim": FEATURE_DIM,
            "fid_held_out_vs_train_n297": fid(model.features(held_out_images), model.features(train))}


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
    n = NUM_HELD_OUT
    held_out_images, held_out_labels = model.held_out_data()
    held_out_labels = held_out_labels.cpu()
    train_same_labels = model.features(model.sample_data(n, seed=REFERENCE_DATA_SEED, labels=held_out_labels))
    train_any = model.features(model.sample_data(n, seed=REFERENCE_DATA_SEED))
    held_out = model.features(held_out_images)

    def draw(labels: Tensor | None, guidance: float = 0.0) -> Tensor:  # the harness's sampler, as a suite calls it
        return sample(model, "heun", nfe=nfe, n=n, seed=seed, schedule="karras", labels=labels,
                      guidance=guidance or None).x

    samples_by_guidance = {w: draw(held_out_labels, w) for w in guidance_scales}
    conditional = samples_by_guidance[0.0] if 0.0 in samples_by_guidance else draw(held_out_labels)
    unconditional = draw(None)
    evaluation = {
        "sampler": f"heun, karras schedule, NFE {nfe}, seed {seed}, N {n}, float32; conditional samples drawn for "
                   "the held-out digits' labels",
        "fid_conditional_samples_vs_train_n297": fid(model.features(conditional), train_same_labels),
        "fid_held_out_vs_train_n297": fid(held_out, train_same_labels),
        "fid_unconditional_samples_vs_train_n297": fid(model.features(unconditional), train_any),
        "fid_held_out_vs_any_train_n297": fid(held_out, train_any),
    }
    for w, samples in samples_by_guidance.items():
        predicted = model.classify(samples).argmax(1).cpu()
        evaluation[f"class_accuracy_guidance_{w:g}"] = (predicted == held_out_labels).double().mean().item()
    return evaluation
