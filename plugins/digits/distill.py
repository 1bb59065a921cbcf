"""Progressive distillation (Salimans and Ho, ICLR 2022) of the digits model into students of 8, 4, 2 and 1 steps:
the recipe `samplerbench train digits --distill`.

The teacher is the shipped digits model sampled with DDIM (eta 0) on the progressive grid of 16 steps
(students.progressive). Each round a student, initialised from its teacher, learns to take in one DDIM step what
the teacher takes in two; it then becomes the teacher of the next round: 16 -> 8 -> 4 -> 2 -> 1 steps.

DDIM in sigma units (plugins/ddim.py, eta 0): from z at sigma_t to sigma_s,

    z_s = D(z; sigma_t) + (sigma_s / sigma_t) (z - D(z; sigma_t)).

The target. Two teacher steps, sigma_t -> sigma_m -> sigma_s (sigma_m the teacher's grid point between the
student's sigma_t and sigma_s):

    z'  = D_teacher(z; sigma_t) + (sigma_m / sigma_t) (z - D_teacher(z; sigma_t))
    z'' = D_teacher(z'; sigma_m) + (sigma_s / sigma_m) (z' - D_teacher(z'; sigma_m)).

The student's one step lands there when its estimate x~ solves x~ + (sigma_s / sigma_t) (z - x~) = z'':

    x~ = (z'' - (sigma_s / sigma_t) z) / (1 - sigma_s / sigma_t),

the paper's Algorithm 2 target, (z'' - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t), with
alpha = 1 in the variance-exploding parametrization. At the last step, sigma_s = 0, it is x~ = z'' =
D_teacher(z'; sigma_m): the harness's last step, x0 = D(x; sigma_last), is DDIM's step to sigma = 0.

x-prediction and weighting under EDM's preconditioning. The student is the teacher's network inside the same
D(z; sigma) = c_skip z + c_out F(c_in z; c_noise), trained on D's error against x~ with EDM's weight
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2:

    loss = lambda(sigma_t) |D_student(z; sigma_t) - x~|^2 = |F(c_in z; c_noise) - (x~ - c_skip z) / c_out|^2,

since lambda c_out^2 = 1: the network's target is unit-variance at every noise level, as in the teacher's training.
With sigma_data = 1, lambda = 1 / sigma^2 + 1 = SNR + 1, the paper's "SNR+1" weighting (with alpha = 1, SNR =
1 / sigma^2): where the signal is drowned (sigma = 80) the weight stays bounded, unlike plain SNR weighting, which
the paper shows fails for few-step students.

The data, as in the paper: z = x + sigma_t eps, a training image x (never a held-out one) noised at a noise level
sigma_t drawn uniformly from the student's own grid (the only levels it is ever asked at), labels dropped to
"no label" one time in ten as in the teacher's training, so the student also imitates the teacher's unconditional
sampler. Every draw (batches, levels, noise, label dropout) comes from one torch.Generator seeded by --seed; the
evaluation draws x_T from the harness's noise streams (bench.core.noise), a generator training never uses. Adam,
the learning rate decayed linearly to 0 over each round (as the paper), dropout off (the target is deterministic).
Deterministic given --seed and the thread count on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from bench.adapters.checkpoints import pretrained_dir, save_checkpoint
from bench.core.guidance import NO_LABEL
from bench.core.sampling import sample
from bench.measure.metrics import REFERENCE_DATA_SEED

from .data import NUM_HELD_OUT, digits_split, training_data_sha256
from .denoiser import DigitsDenoiser, load_digits_model
from .evaluate import fid
from .students import BASE_STEPS, DISTILL_RECIPE, STUDENT_STEPS, progressive, student_name
from .train import minibatches, train_recipe
from .weights import MODEL_NAME


def _column(sigma: Tensor) -> Tensor:
    return sigma.reshape(-1, 1, 1, 1)


def ddim_step(denoised: Tensor, z: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta 0) from z at sigma to sigma_next given D(z; sigma); sigmas [B], one per sample."""
    return denoised + _column(sigma_next / sigma) * (z - denoised)


def distillation_target(teacher, z: Tensor, sigma_t: Tensor, sigma_mid: Tensor, sigma_s: Tensor,
                        labels: Tensor | None) -> Tensor:
    """x~, the estimate that makes one DDIM step from sigma_t to sigma_s land where two teacher DDIM steps (through
    sigma_mid) land (module docstring). ``teacher(z, sigma, labels)`` is a denoiser; sigmas are [B]."""
    denoised = teacher(z, sigma_t, labels)
    z_mid = ddim_step(denoised, z, sigma_t, sigma_mid)
    z_two_steps = ddim_step(teacher(z_mid, sigma_mid, labels), z_mid, sigma_mid, sigma_s)
    ratio = _column(sigma_s / sigma_t)
    return (z_two_steps - ratio * z) / (1 - ratio)


def distill_round(teacher: DigitsDenoiser, student_steps: int, steps: int, generator: torch.Generator,
                  batch_size: int = 64, learning_rate: float = 3e-4, label_dropout: float = 0.1,
                  log_every: int = 200) -> tuple[DigitsDenoiser, dict]:
    """One round: a student of ``student_steps`` steps, initialised from ``teacher`` (sampled on the grid of twice
    as many steps), trained for ``steps`` minibatches; returns it (frozen) and a record of its training."""
    device = teacher.network.conv_in.weight.device
    split = digits_split()
    images, labels = split.train_images.to(device), split.train_labels.to(device)
    teacher_grid = progressive(2 * student_steps, teacher).to(torch.float32)
    student_grid = teacher_grid[::2]
    student = DigitsDenoiser(copy.deepcopy(teacher.network)).eval().requires_grad_(True)  # eval: dropout off
    optimizer = torch.optim.Adam(student.network.parameters(), lr=learning_rate, foreach=True)
    losses, started, cpu_started = [], time.perf_counter(), time.process_time()
    for step, batch in zip(range(steps), minibatches(len(images), batch_size, generator)):
        x, batch_labels = images[batch.to(device)], labels[batch.to(device)]
        dropped = torch.rand(batch_size, generator=generator) < label_dropout
        batch_labels = torch.where(dropped.to(device), torch.full_like(batch_labels, NO_LABEL), batch_labels)
        index = torch.randint(student_steps, (batch_size,), generator=generator)  # the student's step i -> i + 1
        sigma_t, sigma_s = student_grid[index].to(device), student_grid[index + 1].to(device)
        sigma_mid = teacher_grid[2 * index + 1].to(device)
        z = x + _column(sigma_t) * torch.randn(x.shape, generator=generator).to(device)
        with torch.no_grad():
            target = distillation_target(teacher, z, sigma_t, sigma_mid, sigma_s, batch_labels)
        weight = _column((sigma_t ** 2 + student.sigma_data ** 2) / (sigma_t * student.sigma_data) ** 2)
        loss = (weight * (student(z, sigma_t, batch_labels) - target).square()).flatten(1).sum(1).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (1 - step / steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"student {student_steps}: step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tail = losses[-max(1, steps // 10):]
    record = {"loss": sum(tail) / len(tail),
              "loss_window": f"mean distillation loss (per image, summed over pixels) of the last {len(tail)} steps",
              "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "steps": steps,
              "batch_size": batch_size, "learning_rate": learning_rate,
              "learning_rate_decay": "linear to 0", "label_dropout": label_dropout, "student_steps": student_steps,
              "teacher_steps": 2 * student_steps, "grid": progressive(student_steps, teacher).tolist(),
              "teacher_evaluations_per_step": 2 * batch_size}
    return student.requires_grad_(False), record


def evaluate_student(student: DigitsDenoiser, teacher: DigitsDenoiser, steps: int, seed: int = 0) -> dict:
    """The student at its NFE next to the first teacher sampled with DDIM on the same grid and on the base grid:
    conditional samples for the held-out digits' labels, FID against training digits of those labels (N = 297, as
    evaluate.evaluate_denoiser) and class accuracy. x_T from the harness's noise streams, seed ``seed``."""
    held_out_labels = digits_split().held_out_labels
    train = teacher.features(teacher.sample_data(NUM_HELD_OUT, seed=REFERENCE_DATA_SEED, labels=held_out_labels))

    def measure(model: DigitsDenoiser, nfe: int) -> tuple[float, float]:
        x = sample(model, "ddim", nfe=nfe, n=NUM_HELD_OUT, seed=seed, schedule="progressive",
                   labels=held_out_labels).x
        accuracy = (teacher.classify(x).argmax(1).cpu() == held_out_labels).double().mean().item()
        return fid(teacher.features(x), train), accuracy

    (student_fid, student_accuracy), (same_fid, same_accuracy), (base_fid, base_accuracy) = (
        measure(student, steps), measure(teacher, steps), measure(teacher, BASE_STEPS))
    return {"sampler": f"ddim on the progressive grid, seed {seed}, N {NUM_HELD_OUT}, float32; conditional samples "
                       "drawn for the held-out digits' labels, FID against training digits of the same labels",
            f"fid_student_nfe{steps}": student_fid, f"class_accuracy_student_nfe{steps}": student_accuracy,
            f"fid_teacher_ddim_nfe{steps}": same_fid, f"class_accuracy_teacher_ddim_nfe{steps}": same_accuracy,
            f"fid_teacher_ddim_nfe{BASE_STEPS}": base_fid,
            f"class_accuracy_teacher_ddim_nfe{BASE_STEPS}": base_accuracy}


# ------------------------------------------------------------------------------------------- the recipe

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=DISTILL_RECIPE, description="Distill the digits model (sampled with DDIM "
                                     f"on {BASE_STEPS} steps) into students of 8, 4, 2 and 1 steps, each round's "
                                     "student the next round's teacher; evaluate and save each to pretrained/.")
    parser.add_argument("--seed", type=int, default=0, help="seed of batches, noise levels and noise (default 0)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per round (default 600)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="Adam's initial learning rate, decayed "
                        "linearly to 0 over each round (default 3e-4)")
    parser.add_argument("--rounds", type=int, default=len(STUDENT_STEPS), choices=range(1, len(STUDENT_STEPS) + 1),
                        help=f"how many rounds, from 16 -> 8 steps on (default {len(STUDENT_STEPS)}: down to 1 step)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice); 1 on a "
                        "shared machine")
    parser.add_argument("--out", default=None, help="checkpoint directory, which must hold the digits model and "
                        "its classifier (default: $SAMPLERBENCH_PRETRAINED or the repository's pretrained/)")
    parser.add_argument("--no-evaluate", action="store_true", help="save the students without measuring them")
    return parser


def distill_recipe(argv: list[str]) -> list[dict]:
    """`samplerbench train digits --distill [--seed S] [--steps N] [--batch-size B] [--learning-rate L]
    [--rounds R] [--device D] [--threads T] [--out DIR] [--no-evaluate]`: the rounds of progressive distillation
    from the digits model in --out, each student saved there with its manifest entry; returns the entries."""
    options = _parser().parse_args(argv)
    out = Path(options.out) if options.out else pretrained_dir()
    arguments = ["--seed", str(options.seed), "--steps", str(options.steps), "--batch-size", str(options.batch_size),
                 "--learning-rate", repr(options.learning_rate), "--rounds", str(options.rounds),
                 "--device", options.device]
    if options.threads:
        torch.set_num_threads(options.threads)
        arguments += ["--threads", str(options.threads)]
    where = {"device": str(options.device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "load_average_1min_at_start": round(os.getloadavg()[0], 2), "torch": torch.__version__,
             "machine": platform.machine()}
    root = load_digits_model(device=options.device, directory=out)  # the first teacher, verified
    teacher, teacher_name, teacher_sha256 = root, MODEL_NAME, root.checkpoint_sha256
    generator = torch.Generator().manual_seed(options.seed)
    entries = []
    for student_steps in STUDENT_STEPS[:options.rounds]:
        print(f"distilling {2 * student_steps} -> {student_steps} steps ({options.steps} steps of "
              f"{options.batch_size}) on {options.device}", flush=True)
        student, record = distill_round(teacher, student_steps, options.steps, generator, options.batch_size,
                                        options.learning_rate)
        student.extractor = root.extractor
        record = {**record, "teacher": MODEL_NAME, "teacher_sha256": root.checkpoint_sha256,
                  "distilled_from": teacher_name, "distilled_from_sha256": teacher_sha256, **where}
        evaluation = {} if options.no_evaluate else evaluate_student(student.cpu(), root.cpu(), student_steps)
        if evaluation:
            print(", ".join(f"{key} {value:.4f}" for key, value in evaluation.items() if isinstance(value, float)),
                  flush=True)
        entry = save_checkpoint(student_name(student_steps), student.network.state_dict(), DISTILL_RECIPE, arguments,
                                training_data_sha256(), record, evaluation, out)
        print(f"saved {out / entry['file']} (sha256 {entry['sha256']}, {record['seconds']} s)", flush=True)
        entries.append(entry)
        teacher, teacher_name, teacher_sha256 = student.to(options.device), student_name(student_steps), entry["sha256"]
        root.to(options.device)
    return entries


def recipe(argv: list[str]) -> None:
    """The digits model's `samplerbench train digits` recipes: the model and its classifier (train.py), or, with
    --distill, its progressive-distillation students."""
    if "--distill" in argv:
        distill_recipe([argument for argument in argv if argument != "--distill"])
    else:
        train_recipe(argv)
