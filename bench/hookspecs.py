"""The plugin hooks of samplerbench.

Each hook receives a ``register`` callback and calls it once per thing it provides, as llm's plugins do::

    from bench import hookimpl

    @hookimpl
    def register_solvers(register):
        register(MySolver, name="my-solver", aliases=("mine",))

Built-in plugins are loaded through the same entry-point group ("samplerbench") as third-party packages.
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
    """Register solver classes: ``register(cls, name=..., aliases=())``. ``cls(**options)`` builds one."""


@hookspec
def register_schedules(register):
    """Register sigma schedules: ``register(fn, name=..., aliases=())``; ``fn(steps, model, **options)``."""


@hookspec
def register_models(register):
    """Register model loaders: ``register(fn, name=..., aliases=(), train=recipe)``; ``fn(device=..., **options)``
    -> Denoiser. ``train``, optional, is the recipe that makes the model's weights: ``recipe(argv: list[str])``,
    run by ``samplerbench train NAME [ARGS...]``."""


@hookspec
def register_metrics(register):
    """Register metrics: ``register(metric, name=..., aliases=())``; see bench.measure.metrics.Metric."""
