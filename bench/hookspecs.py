"""The plugin hooks of samplerbench.

Each hook receives a ``register`` callback and calls it once per thing it provides, as llm's plugins do::

    from bench import hookimpl

    @hookimpl
    def register_solvers(register):
        register(MySolver, name="my-solver", aliases=("mine",))

Built-in plugins are loaded through the same entry-point group ("samplerbench") as third-party packages.

A learned schedule or solver is registered like any other, with its fit beside it: ``register(fn, name="ld3",
fit=fitter)``. ``fitter(problem)`` (bench.core.fitting.FitProblem) returns named tensors; the harness fits once per
key, stores the result in results/fits/ and hands it back as ``fitted``: to a schedule as ``fn(steps, model,
fitted=..., **options)`` (its grid is ``fitted["sigmas"]``), to a solver as ``solver.use_fit(fitted)``. A learned
thing declares the options ``fit_seed``, ``fit_n`` and ``teacher_steps``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("samplerbench")
hookimpl = pluggy.HookimplMarker("samplerbench")


# Every ``register`` also takes ``data=fn``: for a plugin that loads files beside its code (checkpoints), ``fn()``
# returns their identity, {name: sha256}. A cell's key covers it as it covers the code, so new weights recompute
# the cells that used the old ones.


@hookspec
def register_solvers(register):
    """Register solver classes: ``register(cls, name=..., aliases=(), fit=None)``. ``cls(**options)`` builds one;
    with a ``fit``, it is learned (module docstring)."""


@hookspec
def register_schedules(register):
    """Register sigma schedules: ``register(fn, name=..., aliases=(), fit=None)``; ``fn(steps, model, **options)``;
    with a ``fit``, it is learned (module docstring)."""


@hookspec
def register_models(register):
    """Register model loaders: ``register(fn, name=..., aliases=(), train=recipe)``; ``fn(device=..., **options)``
    -> Denoiser. ``train``, optional, is the recipe that makes the model's weights: ``recipe(argv: list[str])``,
    run by ``samplerbench train NAME [ARGS...]``."""


@hookspec
def register_metrics(register):
    """Register metrics: ``register(metric, name=..., aliases=())``; see bench.measure.metrics.Metric."""
