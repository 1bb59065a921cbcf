"""The command line: `samplerbench run | list | report`."""

from __future__ import annotations

import argparse
import datetime
import sys
from importlib import resources
from pathlib import Path

from bench.errors import BenchError

EXIT_FAILED_CELLS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command stopped by Ctrl-C


def default_suite() -> Path:
    return Path(str(resources.files("bench") / "suites" / "quick.toml"))


def command_run(args: argparse.Namespace) -> int:
    from bench.sweep.runner import run_suite, store_path
    from bench.sweep.suite import load_suite
    from bench.sweep.validate import LIMIT_FLAGS

    limits = {name: getattr(args, f"limit_{name}") for name in LIMIT_FLAGS
              if getattr(args, f"limit_{name}") is not None}  # --max-cells etc.: over the suite's [limits]
    suite = load_suite(args.suite or default_suite(), device=args.device, limits=limits)
    # the suite's name is a plain file stem (bench.sweep.validate.suite_name): these are the only places written
    report_path = Path(args.report) if args.report else Path("reports") / f"{suite.name}.html"
    _check_outputs(Path(args.out), report_path)
    try:
        summary = run_suite(suite, args.out, progress=not args.quiet, executor=args.executor, shards=args.shards,
                            ray_address=args.ray_address, ray_workers=args.ray_workers, rerun=args.rerun,
                            cell_timeout=args.cell_timeout)
    except KeyboardInterrupt:
        path = store_path(suite, args.out)
        if path.exists():
            _write_suite_report(suite, path, report_path, interrupted=True)
            where = f"; the report of the cells done is in {report_path}"
        else:
            where = ""
        print(f"samplerbench: interrupted: the cell in flight was not recorded{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _write_suite_report(suite, summary.store, report_path)
    busy = f", {summary.busy} in progress in another run" if summary.busy else ""
    print(f"{summary.done} cells done, {summary.failed} failed, {summary.skipped} already done{busy}; "
          f"results in {summary.store}, report in {report_path}")
    return EXIT_FAILED_CELLS if summary.failed else 0


def _write_suite_report(suite, store: Path, report_path: Path, interrupted: bool = False) -> None:
    """The report of this suite's cells (not rows an earlier version of the suite left in the store), saying so
    when some have no row yet."""
    from bench.files import remove_stale_temporaries
    from bench.report import write_report
    from bench.sweep.store import claims_in_progress, read_grids, read_results

    keys = [cell.key for cell in suite.cells]
    results = read_results(store, keys=keys)
    missing = len(keys) - len(results)
    notice = None
    if missing:
        elsewhere = len(set(claims_in_progress(store)) & set(keys))
        why = "the run was interrupted" if interrupted else "another run is computing them"
        notice = (f"This report is unfinished: {missing} of {len(keys)} cells have no result yet ({why}"
                  + (f"; {elsewhere} in progress now" if elsewhere else "") + ").")
    remove_stale_temporaries(report_path.parent)
    write_report(results, report_path, title=f"samplerbench: {suite.name}",
                 provenance=_provenance(store, suite_path=str(suite.path)), sample_grids=read_grids(store),
                 notice=notice)


def _check_outputs(out: Path, report: Path) -> None:
    """--out must be (or become) a directory and --report a file, found out before anything runs."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} is a file; give a directory for the results store")
    if report.is_dir():
        raise BenchError(f"--report {str(report)!r} is a directory; give the path of the HTML file to write")
    for path, flag in ((out, "--out"), (report, "--report")):
        existing = next((parent for parent in path.parents if parent.exists()), None)
        if existing is not None and not existing.is_dir():
            raise BenchError(f"{flag} {str(path)!r} lies under {str(existing)!r}, which is a file, not a directory")


def command_list(args: argparse.Namespace) -> int:
    from bench.registry import manager

    plugins = manager()
    for info in plugins.plugins():
        print(f"{info.name}  [{info.source}]")
        for entry in info.registered:
            aliases = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
            print(f"    {entry.kind:<9}{entry.name}{aliases}")
    for name, error in sorted(plugins.failed.items()):
        print(f"{name}  [failed to load: {error}]")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from bench.files import remove_stale_temporaries
    from bench.report import write_report
    from bench.sweep.store import claims_in_progress, read_grids, read_results

    results = Path(args.results)
    out = Path(args.output) if args.output else Path("reports") / f"{results.stem}.html"
    in_progress = claims_in_progress(results)
    notice = (f"A sweep is still running on this store: {len(in_progress)} cells are in progress, and this report "
              "shows what was done when it was drawn." if in_progress else None)
    remove_stale_temporaries(out.parent)
    write_report(read_results(results), out, title=f"samplerbench: {results.stem}", provenance=_provenance(results),
                 sample_grids=read_grids(results), notice=notice)
    print(f"report in {out}")
    return 0


def command_train(args: argparse.Namespace) -> int:
    from bench.registry import manager

    registration = manager().get("model", args.model)
    recipe = registration.extras.get("train")
    if recipe is None:
        trainable = [name for name in manager().names("model") if manager().get("model", name).extras.get("train")]
        raise BenchError(f"model {args.model!r} has no training recipe (models with one: {', '.join(trainable) or 'none'})")
    recipe(args.arguments)
    return 0


def _provenance(store: Path, suite_path: str | None = None) -> dict[str, str]:
    from bench.sweep.provenance import git_sha

    provenance = {"results": str(store), "generated": datetime.datetime.now().isoformat(timespec="seconds"),
                  "report code": git_sha() or "unknown"}
    if suite_path:
        provenance["suite file"] = suite_path
    return provenance


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 2**63 - 1; got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="samplerbench", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a suite (default: the packaged quick suite)")
    run.add_argument("suite", nargs="?", help="suite TOML file")
    run.add_argument("--device", choices=["cpu", "cuda"], help="override the suite's device")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="where cells run: this process, or Ray tasks (a local instance, or RAY_ADDRESS's cluster)")
    run.add_argument("--shards", type=int, default=1, help="Ray tasks per cell, over disjoint sample ranges")
    run.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local instance)")
    run.add_argument("--ray-workers", type=int, help="tasks at once on a local Ray instance (default: one per core)")
    run.add_argument("--out", default="results", help="directory of the results store (default: results/)")
    run.add_argument("--report", help="HTML report path (default: reports/<suite>.html)")
    run.add_argument("--rerun", action="append", default=[], metavar="PATTERN",
                     help="recompute the cells whose solver label, solver name or model matches this glob (or whose "
                          "key starts with it), even if done; repeatable; '*' recomputes every cell")
    run.add_argument("--cell-timeout", type=float, metavar="SECONDS",
                     help="stop a cell after this long and record it as failed (default: the suite's cell_timeout, "
                          "else 3600)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    from bench.sweep.validate import LIMIT_FLAGS, Limits

    limits = run.add_argument_group("size limits", "raise the limits a suite is checked against, which catch typos "
                                    "before hours of compute (a suite's [limits] table raises them too)")
    meaning = {"cells": "cells in the suite", "samples_per_cell": "n, the samples per cell",
               "samples": "samples in all, n x cells", "nfe": "the largest NFE budget"}
    for name, flag in LIMIT_FLAGS.items():
        limits.add_argument(flag, dest=f"limit_{name}", type=_positive, metavar="N",
                            help=f"{meaning[name]} (default: {getattr(Limits(), name):,})")
    run.set_defaults(handler=command_run)
    listing = commands.add_parser("list", help="plugins and what each registered")
    listing.set_defaults(handler=command_list)
    report = commands.add_parser("report", help="write the HTML report of a results store")
    report.add_argument("results", help="results/<suite>.sqlite")
    report.add_argument("-o", "--output", help="HTML path (default: reports/<store name>.html)")
    report.set_defaults(handler=command_report)
    train = commands.add_parser("train", help="train a model by its plugin's own recipe, e.g. `train digits`")
    train.add_argument("model", help="a model with a training recipe")
    train.add_argument("arguments", nargs=argparse.REMAINDER, help="the recipe's own options (see `train NAME --help`)")
    train.set_defaults(handler=command_train)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except BenchError as error:
        print(f"samplerbench: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
