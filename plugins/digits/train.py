"""The recipe that makes the shipped digits checkpoints, `samplerbench train digits`: the training loops of the
classifier and of the diffusion model, and the command line that runs them, evaluates them (evaluate.py) and saves
them with their record in pretrained/manifest.json.

The feature network is trained first: Adam on cross-entropy over the training images, each shifted by up to one
pixel. Then the diffusion model: EDM's loss with log-normal sigma (P_mean = -1.2, P_std = 1.2), Adam with a
learning-rate warm-up, labels dropped to "no label" with probability 0.1 (classifier-free guidance's unconditional
model), and an EMA of the weights, which is what ships. Both are seeded, and deterministic given the seed and the
thread count on the CPU. The defaults (8,000 steps of 128 images, after 2,000 classifier steps) take about 13
minutes on one CPU core; the manifest records the measured time, loss and evaluation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.adapters.checkpoints import pretrained_dir, record_evaluation, save_checkpoint
from bench.core.guidance import NO_LABEL

from .data import NUM_HELD_OUT, digits_split, training_data_sha256
from .denoiser import SIGMA_DATA, DigitsDenoiser, load_digits_model
from .evaluate import evaluate_classifier, evaluate_denoiser
from .features import create_digits_feature_extractor
from .networks import DigitsClassifier, DigitsUNet
from .weights import CLASSIFIER_NAME, MODEL_NAME, RECIPE, load_classifier


# ---------------------------------------------------------------------------------------------- training

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



# ------------------------------------------------------------------------------------------- the recipe

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=RECIPE, description="Train the digits feature network (classifier), "
                                     "then the diffusion model; evaluate both and save them to pretrained/. "
                                     "With --distill: distill the model into few-step students instead (see "
                                     "--distill --help).")
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

    classifier, _ = load_classifier(out)  # as saved, so the model is evaluated with the classifier that ships
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

