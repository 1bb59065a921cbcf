"""Hundreds of malformed suites, generated from one valid suite: each must be one clear error, found before anything
runs. Through the command line, in this process: exit code 2, stderr one line `samplerbench: error: ...` naming the
file (no traceback), and not one file written, inside --out or anywhere else.

The cases are mutations of BASE, one fault each (BASE itself is checked to be valid), in kinds: wrong types; huge,
negative, NaN and infinite numbers; deep nesting; bad encodings; NUL, control characters and long strings; names
that are paths; empty and repeated axes; unknown keys at every level; devices this machine lacks; bad options for
models, solvers, and schedules at the top level and inside a solver; sizes over the limits; faults only a loaded
model reveals (checked by the runner's prepare, before the store opens). Seeded: the same cases every run.
"""

from __future__ import annotations

import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.sweep.suite import load_suite

SEED = 11
SECONDS_PER_CASE = 30  # parsing fails in milliseconds; this only turns a hang into a failure

TOP = {  # the valid suite's top-level keys, as TOML
    "name": '"fuzz"', "device": '"cpu"', "dtype": '"float32"', "n": "4", "batch_size": "4", "seeds": "[0]",
    "nfe": "[2]", "schedules": '["karras"]', "metrics": "[]", "precision": '"fp32"', "labels": '"none"',
    "description": '"a valid suite"',
}
LIMITS = {"cells": "100"}
MODEL = {"name": '"gmm2d"'}
DDIM = {"name": '"ddim"', "eta": "0.5", "label": '"ddim-half"', "nfe": "[3]"}  # on the top-level schedules
EULER = {"name": '"euler"', "schedules": '[{ name = "karras", rho = 7.0 }]'}  # on the top-level budgets
RK45 = {"name": '"rk45"', "tolerances": "[1e-2]"}


def render(top=TOP, limits=LIMITS, models=(MODEL,), solvers=(DDIM, EULER, RK45), extra: str = "") -> str:
    lines = [f"{key} = {value}" for key, value in top.items()] + [extra]
    if limits is not None:
        lines += ["[limits]"] + [f"{key} = {value}" for key, value in limits.items()]
    for section, tables in (("models", models), ("solvers", solvers)):
        for table in tables:
            lines += [f"[[{section}]]"] + [f"{key} = {value}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


BASE = render()

DEEP_ARRAY = "[" * 1000 + "]" * 1000
DEEP_TABLE = "{ a = " * 1000 + "1" + " }" * 1000
HUGE_INT = "1" + "0" * 400
HUGE_FLOAT = "1" + "0" * 400 + ".5"
LONGEST_INT = "9" * 5000  # beyond what Python reads as a decimal integer
HUGE_HEX = "0x" + "f" * 5000  # which it reads in hexadecimal
LONG = '"' + "x" * 5000 + '"'
# invalid wherever they stand: no key of a suite takes them
ALWAYS_BAD = ["1979-05-27", "07:32:00", "nan", "inf", "-inf", "9223372036854775808", "-9223372036854775809",
              HUGE_INT, HUGE_FLOAT, LONGEST_INT, HUGE_HEX, "-0x1", "0b" + "1" * 64, DEEP_ARRAY, DEEP_TABLE,
              '"a\\u0000b"', '"bell\\u0007"', LONG, "[[[[[[[[[1]]]]]]]]]",
              "{ a = { b = { c = { d = { e = { f = { g = { h = 1 } } } } } } } }"]


def with_top(**values) -> str:
    return render(top={**TOP, **values})


def with_limits(**values) -> str:
    return render(limits={**LIMITS, **values})


def with_model(**values) -> str:
    return render(models=({**MODEL, **values},))


def with_ddim(**values) -> str:
    return render(solvers=({**DDIM, **values}, EULER, RK45))


def with_euler(**values) -> str:
    return render(solvers=(DDIM, {**EULER, **values}, RK45))


def with_rk45(**values) -> str:
    return render(solvers=(DDIM, EULER, {**RK45, **values}))


def without(table: dict, key: str) -> dict:
    return {k: v for k, v in table.items() if k != key}


def cases(tmp: Path) -> list[tuple[str, bytes | str, str]]:
    """(what is wrong, the file's content, the file's name)."""
    rng = random.Random(SEED)
    found: list[tuple[str, bytes | str, str]] = []

    def add(what: str, content: bytes | str, file_name: str = "suite.toml") -> None:
        found.append((what, content, file_name))

    # names that are paths, or not file names at all
    for bad in ['""', f'"{tmp / "abs" / "pwned"}"', '"../../e"', '"../e"', '"a/b"', '"a\\\\b"', '"."', '".."',
                '".hidden"', '"-dash"', '"x y"', '"\\u00e9t\\u00e9"', '"rtl\\u202eexe"', '"tab\\tname"',
                '"' + "n" * 300 + '"', '"a\\u0000b"', "1", "true", "[]", "{ a = 1 }"]:
        add(f"name = {bad[:40]}", with_top(name=bad))
    for file_name in ["my suite.toml", ".hidden.toml", "x" * 100 + ".toml", "é.toml"]:
        add(f"no name, file {file_name[:20]}", render(top=without(TOP, "name")), file_name)

    # top-level values
    cuda = ['"cuda:99"', '"cuda:12345"'] + ([] if torch.cuda.is_available() else ['"cuda"', '"cuda:0"'])
    per_key = {
        "device": cuda + ['"cpu:abc"', '"cpu:0"', '"gpu"', '""', '"cuda:-1"', '"CPU"', '"cuda:"', '" cpu"', "1",
                          '["cpu"]', '"mps"'],
        "dtype": ['"float8"', '"Float32"', "1", '""', '["float32"]'],
        "n": ["0", "-1", "1.5", "4.0", '"4"', "true", "[4]", "10000001", "100000000000", LONGEST_INT, HUGE_HEX],
        "batch_size": ["0", "-4", "2.0", '"4"', "false", "9223372036854775807"],
        "seeds": ["[]", "[0, 0]", "[-1]", "[1.5]", '["0"]', "0", "[true]", "[[0]]", "[0, 1, 0]",
                  "[" + ", ".join(map(str, range(20000))) + "]"],
        "nfe": ["[]", "[2, 2]", "[0]", "[-3]", "[2.5]", '["2"]', "[9223372036854775807]",
                "[100000000000000000000000]", "[100000000]", "[10001]", "2", "[true]", "[{ a = 1 }]"],
        "schedules": ["[]", '["karras", "karras"]', '["karas"]', '"karras"', "[1]", "[{ rho = 2 }]",
                      '[{ name = "karras", rho = "x" }]', '[{ name = "karras", rhoo = 2 }]',
                      '[{ name = "karras", sigma_min = 1.0, sigma_max = 0.1 }]', '[{ name = "karras", rho = [1] }]',
                      '[{ name = "karras", rho = { a = 1 } }]', '[{ name = "karras", rho = true }]',
                      '[{ name = "time-uniform", beta_min = "x" }]', '[{ name = "karras", label = "a\\u0000" }]',
                      '[{ name = "karras", rho = 7 }, { name = "karras", rho = 7.0 }]',
                      '[{ name = "logsnr", rho = 2 }]', '[{ name = "karras", rho = "7\\nx" }]',
                      # only the model can tell: the runner's prepare refuses them before the store opens
                      '[{ name = "discrete" }]', '[{ name = "karras", rho = 1e300 }]'],
        "metrics": ['["fdi"]', '["fid", "fid"]', "[1]", '"fid"', '[""]'],
        "labels": ['"all"', "1", '""', '"None"'],
        "precision": ['"fp64"', "[]", '["fp32", "fp32"]', "[1]", '["bf16", "x"]', "1"],
        "cuda_graph": ['"yes"', "1", "true"],
        "feature_extractor_weights_path": [f'"{tmp / "no" / "weights.pth"}"', "1", '["w"]'],
        "description": ["1", '["x"]', "true"],
        "limits": ["5", '"x"', "[1]"],
    }
    for key, values in per_key.items():
        for bad in values:
            text = with_top(**{key: bad}) if key != "limits" else render(top={**TOP, "limits": bad}, limits=None)
            add(f"{key} = {bad[:40]}", text)
    for bad in ["[nan]", "[inf]", "[-inf]", "[1e30]", f"[{HUGE_INT}]", f"[{HUGE_FLOAT}]", "[]", "[1.0, 1.0]",
                "[1, 1.0]", "[-2.0]", "[101.0]", '["1"]', "1.0", "[true]"]:
        add(f"guidance = {bad[:40]}", with_top(labels='"balanced"', guidance=bad))
    for bad in ['"clf"', "1", '""']:
        add(f"guidance_type = {bad}", with_top(labels='"balanced"', guidance="[1.0]", guidance_type=bad))
    add("guidance without labels", with_top(guidance="[1.0]"))

    # the limits table
    for values in [dict(cells="0"), dict(cells="-1"), dict(cells='"x"'), dict(cellz="5"), dict(nfe="1"),
                   dict(samples_per_cell="3"), dict(samples="5"), dict(cells="1"), dict(cells="1.5"),
                   dict(nfe="2.0"), dict(cells="true")]:
        add(f"[limits] {values}", with_limits(**values))

    # unknown keys and odd keys at the top
    for extra in ["samples = 32", "seed = 0", 'Name = "x"', '"" = 1', '"\\u0000" = 1', f'"{"k" * 100}" = 1',
                  "when = 1979-05-27T07:32:00Z", "[extra]\na = 1"]:
        add(f"extra {extra[:30]!r}", render(extra=extra))

    # models
    for values in [dict(seed="0"), dict(name='"gmm-image"', seed="1.5"), dict(name='"gmm-image"', seed='"x"'),
                   dict(name='"gmm-image"', seed="true"), dict(name='"gmm-image"', seed="[1]"),
                   dict(name='"gmm-image"', seed="nan"), dict(name='"gmm-image"', seed="9223372036854775808"),
                   dict(name='"gmm-image"', sed="0"), dict(name='"gmm2"'), dict(name="1"), dict(name='""'),
                   dict(device='"cuda"'), dict(label='"a\\u0000"'), dict(name='"gmm2d\\u0000"')]:
        add(f"[[models]] {values}", with_model(**values))
    add("[[models]] without a name", render(models=({"seed": "0"},)))
    add("[[models]] twice", render(models=(MODEL, MODEL)))
    add("no [[models]]", render(models=()))
    add("models = a string", render(top={**TOP, "models": '"gmm2d"'}, models=()))
    add("models = []", render(top={**TOP, "models": "[]"}, models=()))

    # solvers: a fixed-step one with options, and an adaptive one
    for values in [dict(eta="nan"), dict(eta="inf"), dict(eta='"x"'), dict(eta="true"), dict(eta="[0.5]"),
                   dict(eta="{ a = 1 }"), dict(eta="-1.0"), dict(eta="1e400"), dict(etta="1"), dict(foo='"bar"'),
                   dict(name='"dpmsolver"'), dict(name="1"), dict(label='"a\\u0000"'), dict(label=LONG),
                   dict(label='"' + "l" * 300 + '"'), dict(nfe="[]"), dict(nfe="[3, 3]"), dict(nfe="[0]"),
                   dict(nfe="[100000000]"), dict(nfe="[9223372036854775807]"), dict(nfe="[100000000000000000000000]"),
                   dict(nfe="[1.5]"), dict(nfe="3"), dict(tolerances="[1e-2]"), dict(schedules="[]"),
                   dict(schedules='[{ name = "karras", rho = nan }]'), dict(schedules='[{ name = "karras", rho = "x" }]'),
                   dict(schedules='[{ name = "karras", rhoo = 1 }]'),
                   dict(schedules='[{ name = "karras", sigma_min = 1.0, sigma_max = 0.1 }]'),
                   dict(schedules='["karras", "karras"]'), dict(schedules='[{ name = "karras", rho = inf }]'),
                   dict(schedules='[{ name = "karras", rho = 1e300 }]'), dict(schedules='["discrete"]'),
                   dict(schedules='[{ name = "karras", rho = 7, sigma = 1 }]')]:
        add(f"[[solvers]] ddim {list(values.items())[0][0]} = {str(list(values.values())[0])[:30]}",
            with_ddim(**values))
    for table in [dict(name='"deis"', order="2.0"), dict(name='"dpm-solver++"', sde='"yes"'),
                  dict(name='"pndm"', method="1"), dict(name='"pndm"', method='"f-\\npndm"'), dict(name='"unipc"', disable_corrector='["x"]'),
                  dict(name='"unipc"', disable_corrector='[1, "x"]'), dict(name='"edm-stochastic"', s_churn="nan"),
                  dict(name='"edm-stochastic"', s_churn='"x"'), dict(name='"dpm-solver"', order="true")]:
        add(f"[[solvers]] {table}", render(solvers=(table, EULER, RK45)))
    for values in [dict(schedules='[{ name = "karras", rho = nan }]'), dict(schedules='[{ name = "karras", rho = "x" }]'),
                   dict(schedules='[{ name = "karras", rho = 1e300 }]'), dict(schedules='["discrete"]'),
                   dict(schedules='[{ name = "karras", sigma_min = 1.0, sigma_max = 0.1 }]'), dict(nfe="[]"),
                   dict(schedules='[{ name = "karras", rho = 7.0 }, "karras"]')]:
        add(f"[[solvers]] euler {values}", with_euler(**values))
    add("[[solvers]] without a name", render(solvers=(without(DDIM, "name"), EULER, RK45)))
    for values in [dict(tolerances="[]"), dict(tolerances="[nan]"), dict(tolerances="[0]"), dict(tolerances="[-1e-3]"),
                   dict(tolerances="[2.0]"), dict(tolerances="[1e-13]"), dict(tolerances="[1e-2, 1e-2]"),
                   dict(tolerances='["x"]'), dict(tolerances="1e-2"), dict(nfe="[4]"), dict(schedules='["karras"]'),
                   dict(rtol="1e-3"), dict(tolerances=f"[{HUGE_FLOAT}]")]:
        add(f"[[solvers]] rk45 {values}", with_rk45(**values))
    add("rk45 without tolerances", render(solvers=(DDIM, EULER, without(RK45, "tolerances"))))
    add("the same [[solvers]] entry twice", render(solvers=(DDIM, EULER, DDIM, RK45)))
    add("one label, two configs", render(solvers=(DDIM, EULER, {**DDIM, "eta": "0.25"}, RK45)))
    add("the same config, 1 and 1.0", render(solvers=({**DDIM, "eta": "1"}, EULER, {**DDIM, "eta": "1.0"}, RK45)))
    add("no [[solvers]]", render(solvers=()))
    add("solvers = a string", render(top={**TOP, "solvers": '"euler"'}, solvers=()))

    # values no key takes, at every level, chosen at random
    slots = [lambda v, k=k: with_top(**{k: v}) for k in TOP] + [
        lambda v: with_limits(cells=v), lambda v: with_model(name='"gmm-image"', seed=v), lambda v: with_ddim(eta=v),
        lambda v: with_ddim(nfe=v), lambda v: with_ddim(schedules=f'[{{ name = "karras", rho = {v} }}]'),
        lambda v: with_top(schedules=f'[{{ name = "time-uniform", beta_max = {v} }}]'),
        lambda v: with_rk45(tolerances=v), lambda v: with_top(seeds=f"[0, {v}]"), lambda v: with_top(nfe=f"[{v}]")]
    for index in range(160):
        bad = rng.choice(ALWAYS_BAD)
        slot = rng.randrange(len(slots))
        add(f"random {index}: slot {slot} = {bad[:30]}", slots[slot](bad))

    # deep nesting, as arrays, inline tables, dotted keys and table headers
    add("deep array", render(extra=f"x = {DEEP_ARRAY}"))
    add("deep inline table", render(extra=f"x = {DEEP_TABLE}"))
    add("deep dotted key", render(extra="a" + ".a" * 1000 + " = 1"))
    add("deep table header", BASE + "[" + "a." * 1000 + "a]\nb = 1\n")
    add("deep seeds", with_top(seeds="[" * 50 + "0" + "]" * 50))

    # encodings and bytes that are not a suite
    add("UTF-16 with a BOM", BASE.encode("utf-16"))
    add("UTF-16-LE", BASE.encode("utf-16-le"))
    add("UTF-16-BE", BASE.encode("utf-16-be"))
    add("UTF-32", BASE.encode("utf-32"))
    add("Latin-1", with_top(description='"caf\u00e9"').encode("latin-1"))
    add("cp1252", with_top(description='"\u20ac5"').encode("cp1252"))
    add("a NUL byte", BASE.encode().replace(b"n = 4", b"n = \x004"))
    add("a cut UTF-8 sequence", BASE.encode().replace(b'"a valid suite"', b'"a \xe2\x82"'))
    add("a PNG header", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    add("empty", b"")
    add("whitespace", b"  \n\t\n")
    add("invalid TOML", BASE.replace("n = 4", "n = "))
    add("a key twice", BASE.replace("n = 4", "n = 4\nn = 5"))
    add("an unterminated string", BASE.replace('"fuzz"', '"fuzz'))
    add("over 1 MiB", BASE + "# " + "x" * (1 << 20) + "\n")
    for index in range(24):
        add(f"random bytes {index}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
    for index in range(12):  # valid UTF-8, random characters
        add(f"random text {index}", "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)]))
                                            for _ in range(rng.randrange(1, 200))))
    return found


@contextmanager
def time_limit(seconds: float):
    def expired(signum, frame):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_under(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(directory, name), root)
            for directory, _, names in os.walk(root) for name in names}


def test_the_base_suite_is_valid(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text(BASE)
    suite = load_suite(path)
    assert suite.name == "fuzz" and len(suite.cells) == 3


def test_malformed_suites_are_one_clear_error_and_write_nothing(tmp_path, monkeypatch, capsys):
    generated = cases(tmp_path)
    assert len(generated) > 300
    work = tmp_path / "w" / "a" / "b"  # name = "../../e" would write into tmp_path / "w"
    work.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # and a path relative to the working directory would land here
    capsys.readouterr()
    failures = []
    for what, content, file_name in generated:
        path = work / file_name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        out, report = work / "out", work / "report" / "r.html"
        try:
            with time_limit(SECONDS_PER_CASE):
                code = main(["run", str(path), "--out", str(out), "--report", str(report), "--quiet"])
            problem = None
        except BaseException as error:  # noqa: BLE001 (a traceback, a hang, an exit: all are failures here)
            code, problem = None, f"raised {type(error).__name__}: {str(error)[:300]}"
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        path.unlink()
        left = files_under(tmp_path)
        if problem is None and code != 2:
            problem = f"exit code {code}"
        elif problem is None and (len(lines) != 1 or not lines[0].startswith("samplerbench: error: ")
                                  or str(path) not in lines[0]):
            problem = f"stderr is not one error line naming the file: {captured.err[:600]!r}"
        elif left:
            problem = f"left files behind: {sorted(left)[:5]}"
        if problem:
            shown = content[:400] if isinstance(content, str) else content[:200]
            failures.append(f"{what}: {problem}\n--- suite ({file_name}) ---\n{shown}")
        for name in left:  # the next case starts clean
            (tmp_path / name).unlink()
    assert not failures, f"{len(failures)} of {len(generated)} malformed suites mishandled:\n\n" + "\n\n".join(
        failures[:10])
