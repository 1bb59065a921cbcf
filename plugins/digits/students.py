"""The distilled students of the digits model and how a suite samples them: the grid they were distilled on, their
checkpoints, and the solver `distilled`.

A student of N steps (Salimans and Ho 2022, progressive distillation; the recipe is distill.py) is a copy of the
digits UNet trained so that one DDIM step of it on its own grid lands where two DDIM steps of its teacher land. It
is a sampler as much as a network: it is right only at its own N noise levels, and only under DDIM. So a suite does
not list a student as a model (it would get a report section of its own, and any solver at any NFE); it samples
the digits model with the solver `distilled`, which at NFE N swaps in the student of N steps and runs DDIM on the
student's grid:

    [[solvers]]
    name = "distilled"
    nfe = [1, 2, 4, 8]
    schedules = ["progressive"]

so the student's row sits in the digits model's section beside the teacher's solvers at the same NFE. Any other
NFE is refused when the suite is read, any other grid when the cell is drawn, and a teacher other than the
checkpoint the students were distilled from when the student is loaded, each with the reason.

The grid. Progressive distillation halves a fixed grid: the students of 8, 4, 2 and 1 steps use every 2nd, 4th,
8th and 16th point of a grid of BASE_STEPS = 16 steps, EDM's (Karras et al. 2022, Eq. 5, rho = 7) over the model's
[sigma_min, sigma_max] with 0 appended. The schedule `progressive` gives it for any model and any N dividing 16;
`ddim` on the teacher with it is the teacher the N-step student imitates.

Guidance. The students were distilled from the conditional and the unconditional ("no label") sampler; under
classifier-free guidance the harness combines the student's own two predictions, which no round was trained to
match: measured, not promised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from bench.adapters.checkpoints import load_checkpoint
from bench.core.solver import Plan
from bench.core.steps import StepSolver
from bench.errors import BenchError

from .denoiser import DigitsDenoiser
from .networks import DigitsUNet
from .weights import MODEL_NAME

BASE_STEPS = 16  # the grid the first teacher (the digits model under DDIM) is sampled on
RHO = 7.0
STUDENT_STEPS = (8, 4, 2, 1)  # the students the recipe makes, one per round
DISTILL_RECIPE = "samplerbench train digits --distill"


def student_name(steps: int) -> str:
    """The checkpoint of the student of ``steps`` steps in pretrained/manifest.json."""
    return f"{MODEL_NAME}-student-{steps}"


def progressive(steps: int, model, base_steps: int = BASE_STEPS, rho: float = RHO) -> Tensor:
    """The grid of progressive distillation: EDM's grid of ``base_steps`` steps, every (base_steps / steps)-th
    point, so that the grid of N steps is every other point of the grid of 2N steps (module docstring)."""
    if steps < 1 or base_steps % steps:
        allowed = ", ".join(str(n) for n in range(1, base_steps + 1) if base_steps % n == 0)
        raise ValueError(f"the progressive grid halves a grid of {base_steps} steps: its step counts are {allowed}; "
                         f"got {steps}")
    ramp = torch.linspace(0, 1, base_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = model.sigma_max ** (1 / rho), model.sigma_min ** (1 / rho)
    base = torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, torch.zeros(1, dtype=torch.float64)])
    return base[::base_steps // steps]


def load_student(teacher: DigitsDenoiser, steps: int, directory: str | Path | None = None) -> DigitsDenoiser:
    """The student of ``steps`` steps distilled from ``teacher``, as a DigitsDenoiser with the teacher's feature
    network, loaded from checkpoint "digits-student-N" through the verified loader (its sha256 checked against
    the manifest in ``directory``, default $SAMPLERBENCH_PRETRAINED, else the shipped pretrained/). Its grid is
    the one its training record names (``training.grid``).

    Refused when the teacher is not the checkpoint the student was distilled from (``training.teacher_sha256``):
    a student of another teacher imitates another sampler.
    """
    if steps not in STUDENT_STEPS:
        raise BenchError(f"there is no student of {steps} steps: the distilled students take "
                         f"{', '.join(map(str, sorted(STUDENT_STEPS)))} steps")
    checkpoint = load_checkpoint(student_name(steps), directory, made_by=DISTILL_RECIPE)
    record = checkpoint.entry.get("training")
    grid = record.get("grid") if isinstance(record, dict) else None
    if not (isinstance(grid, list) and len(grid) == steps + 1 and all(isinstance(s, float) for s in grid)):
        raise BenchError(f"the manifest entry of {checkpoint.path} does not record the student's grid (training.grid, "
                         f"{steps + 1} sigmas); run `{DISTILL_RECIPE}` to remake it")
    teacher_sha256 = getattr(teacher, "checkpoint_sha256", None)
    if record.get("teacher_sha256") != teacher_sha256:
        raise BenchError(f"the student {checkpoint.path} was distilled from the digits checkpoint with sha256 "
                         f"{str(record.get('teacher_sha256'))[:80]!r}, not from this model "
                         f"({getattr(teacher, 'name', type(teacher).__name__)!r}, checkpoint sha256 "
                         f"{teacher_sha256!r}); sample the shipped digits model, or run `{DISTILL_RECIPE}` to "
                         "distill students of this one")
    network = checkpoint.load_into(DigitsUNet())
    device = teacher.network.conv_in.weight.device
    student = DigitsDenoiser(network, teacher.extractor, checkpoint.sha256, teacher.classifier_sha256)
    student.name = student_name(steps)
    student.grid = torch.tensor(grid, dtype=torch.float64)  # the sigmas it was distilled on
    return student.to(device).eval().requires_grad_(False)


class Distilled(StepSolver):
    """The digits model's progressive-distillation student of NFE steps, sampled as it was trained: DDIM (eta 0)
    on its own grid, one student call per step. Only NFE 1, 2, 4 and 8 (the shipped students) and the schedule
    `progressive` are accepted; the model must be the digits checkpoint the students were distilled from."""

    order = 1

    @property
    def order_note(self) -> str:
        return "a distilled student: trained for one grid of each step count, it does not converge as steps grow"

    def plan(self, nfe: int) -> Plan:
        if nfe not in STUDENT_STEPS:
            raise BenchError(f"solver 'distilled' samples the student of NFE steps, and the students take "
                             f"{', '.join(map(str, sorted(STUDENT_STEPS)))} steps; got NFE {nfe}. Give it "
                             "nfe = [1, 2, 4, 8], or sample the teacher with another solver at this NFE")
        return Plan(steps=nfe, nfe=nfe, orders=(1,) * nfe)

    def network(self, model, plan: Plan, sigmas: Tensor):
        student = load_student(model, plan.steps)
        if sigmas.shape != student.grid.shape or not torch.equal(sigmas, student.grid):
            raise BenchError(f"solver 'distilled': the student of {plan.steps} steps was distilled on the grid "
                             f"{[round(s, 4) for s in student.grid.tolist()]}, and is sampled only on it; got "
                             f"{[round(s, 4) for s in sigmas.tolist()]}. Give it schedules = [\"progressive\"]")
        return student

    def step(self, i: int, x: Tensor, estimates: tuple[Tensor, ...], sigmas: Tensor, orders: tuple[int, ...],
             noise: Tensor | None) -> Tensor:
        sigma, sigma_next, denoised = sigmas[i].item(), sigmas[i + 1].item(), estimates[-1]
        return torch.lerp(denoised, x, sigma_next / sigma)  # DDIM: D + (sigma_next / sigma) (x - D)
