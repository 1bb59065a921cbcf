"""The command line: run, list, report, and the exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from helpers import TINY_SUITE, write_suite


def test_run_writes_store_and_report(tmp_path, capsys):
    suite = write_suite(tmp_path)
    report = tmp_path / "reports" / "tiny.html"
    assert main(["run", str(suite), "--out", str(tmp_path / "results"), "--report", str(report), "--quiet"]) == 0
    assert (tmp_path / "results" / "tiny.sqlite").exists()
    html = report.read_text()
    assert "<html" in html and "euler" in html and "heun" in html
    assert "8 cells done, 0 failed" in capsys.readouterr().out


def test_failed_cells_make_run_exit_non_zero(tmp_path, monkeypatch):
    import bench.sweep.runner

    def broken(*args, **kwargs):
        raise RuntimeError("no luck")

    monkeypatch.setattr(bench.sweep.runner, "measure", broken)
    suite = write_suite(tmp_path)
    assert main(["run", str(suite), "--out", str(tmp_path), "--report", str(tmp_path / "r.html"), "--quiet"]) == 1


def test_bad_suite_exits_2_with_the_reason_and_writes_nothing(tmp_path, capsys):
    suite = write_suite(tmp_path, TINY_SUITE.replace('name = "euler"', 'name = "dpmsolver"'))
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--report", str(tmp_path / "r.html"), "--quiet"]) == 2
    assert "unknown solver 'dpmsolver'" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.html").exists()


def test_report_from_a_store(tmp_path, capsys):
    suite = write_suite(tmp_path)
    main(["run", str(suite), "--out", str(tmp_path), "--report", str(tmp_path / "first.html"), "--quiet"])
    assert main(["report", str(tmp_path / "tiny.sqlite"), "-o", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text().count("<html") == 1
    assert main(["report", str(tmp_path / "missing.sqlite"), "-o", str(tmp_path / "x.html")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_list_shows_plugins_sources_and_registrations(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "euler  [samplerbench" in out
    assert "solver   euler" in out and "model    gmm2d" in out and "schedule karras" in out
    assert "metric   fid" in out


@pytest.mark.slow  # seconds to a minute on a loaded 2-core machine: `make bench` runs it
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "samplerbench"
    result = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "heun" in result.stdout


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("name", ["../../escaped", "{tmp}/elsewhere/pwned", "", ".hidden", "a/b"])
def test_a_suite_name_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w" / "a"
    work.mkdir(parents=True)
    suite = write_suite(work, TINY_SUITE.replace('name = "tiny"', f'name = "{name.format(tmp=tmp_path)}"'))
    assert main(["run", str(suite), "--out", str(work / "out"), "--report", str(work / "r.html"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"samplerbench: error: {suite}: name = ") and "is not a plain file name" in err
    assert files_under(tmp_path) == {"w/a/tiny.toml"}


@pytest.mark.parametrize("schedules", ['["discrete"]', '[{ name = "karras", rho = 1e300 }]'])
def test_what_only_the_model_can_tell_is_refused_before_anything_is_written(tmp_path, capsys, schedules):
    # parsing passes (names, types, finiteness); the runner's prepare loads gmm2d and refuses the schedule
    suite = write_suite(tmp_path, TINY_SUITE.replace("nfe = [3, 5]", f"nfe = [3, 5]\nschedules = {schedules}"))
    out, report = tmp_path / "out", tmp_path / "r.html"
    assert main(["run", str(suite), "--out", str(out), "--report", str(report), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"samplerbench: error: {suite}: solver 'heun', model 'gmm2d': schedule ")
    assert len(err.splitlines()) == 1 and files_under(tmp_path) == {"tiny.toml"}


@pytest.mark.parametrize("schedule", ['{ name = "karras", rho = 0 }', '{ name = "karras", rho = 1e-300 }',
                                      '{ name = "time-uniform", beta_max = 0.0 }'])
def test_a_schedule_that_fails_on_the_model_is_one_clear_error(tmp_path, capsys, schedule):
    suite = write_suite(tmp_path, TINY_SUITE.replace("nfe = [3, 5]", f"nfe = [3, 5]\nschedules = [{schedule}]"))
    assert main(["run", str(suite), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.html"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samplerbench: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert files_under(tmp_path) == {"tiny.toml"}


SMALL = TINY_SUITE.replace("n = 32", "n = 4").replace('metrics = ["trajectory_error", "frechet_exact", "fid", '
                                                      '"precision", "recall"]', "metrics = []")


def test_limit_flags_raise_the_suites_limits(tmp_path, capsys):
    suite = write_suite(tmp_path, SMALL + "[limits]\ncells = 2\n")  # 8 cells
    args = ["run", str(suite), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.html"), "--quiet"]
    assert main(args) == 2
    assert "is 8, above the limit of 2; if that is what you meant, raise it with `[limits] cells = 8` in the suite " \
           "or `--max-cells 8` on the command line" in capsys.readouterr().err
    assert files_under(tmp_path) == {"tiny.toml"}
    assert main(args + ["--max-cells", "8"]) == 0
    assert "8 cells done, 0 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--max-cells", "0"])
    assert exit_.value.code == 2 and "expected a number from 1 to 2**63 - 1; got 0" in capsys.readouterr().err


def test_out_must_be_a_directory_and_report_a_file(tmp_path, capsys):
    suite = write_suite(tmp_path, SMALL)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    for out, report, message in [
        ("a_file", "r.html", "--out '{tmp}/a_file' is a file; give a directory"),
        ("a_file/results", "r.html", "--out '{tmp}/a_file/results' lies under '{tmp}/a_file', which is a file"),
        ("out", "a_dir", "--report '{tmp}/a_dir' is a directory; give the path of the HTML file"),
        ("out", "a_file/r.html", "--report '{tmp}/a_file/r.html' lies under '{tmp}/a_file', which is a file"),
    ]:
        assert main(["run", str(suite), "--out", str(tmp_path / out), "--report", str(tmp_path / report),
                     "--quiet"]) == 2
        assert message.format(tmp=tmp_path) in capsys.readouterr().err
        assert files_under(tmp_path) == {"tiny.toml", "a_file"}
