"""digits: a small class-conditional diffusion model of scikit-learn's 8x8 handwritten digits, and the feature
network that measures its samples. Both are trained by the project (`samplerbench train digits`) and shipped in
pretrained/ with their sha256 and recipe.

This module only tells the harness what the plugin provides; each idea lives in its own module:

    data.py       the images (scikit-learn's bundled digits), the fixed train / held-out split, the pixel mapping
    networks.py   the UNet inside the diffusion model, and the classifier whose features measure samples
    weights.py    the two shipped checkpoints, loaded through bench.adapters.checkpoints
    features.py   the classifier as torch-fidelity's "samplerbench-digits" extractor; the class_accuracy metric
    denoiser.py   EDM's preconditioning, the label convention (-1: no label) and load_digits_model
    evaluate.py   the figures the recipe records: accuracy, FID, class accuracy under guidance
    train.py      the recipe `samplerbench train digits` and its command line
    students.py   the distilled students: their grid (schedule `progressive`), loading, the solver `distilled`
    distill.py    progressive distillation, `samplerbench train digits --distill`

Imports run one way, data -> networks -> weights -> features -> denoiser -> evaluate -> train -> students ->
distill, and reach outside the package only into bench.
"""

from bench.hookspecs import hookimpl
from bench.measure.metrics import Metric

from .denoiser import load_digits_model
from .distill import recipe
from .features import class_accuracy
from .students import Distilled, progressive
from .weights import MODEL_NAME, shipped_weights


@hookimpl
def register_models(register):
    register(load_digits_model, name=MODEL_NAME, train=recipe, data=shipped_weights)


@hookimpl
def register_solvers(register):
    register(Distilled, name="distilled", data=shipped_weights)


@hookimpl
def register_schedules(register):
    register(progressive, name="progressive")


@hookimpl
def register_metrics(register):
    register(Metric(class_accuracy, "higher", "share of samples the digits classifier reads as their label"),
             name="class_accuracy", data=shipped_weights)
