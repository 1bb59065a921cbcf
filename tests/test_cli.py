"""The command line: run, list, report, and the exit codes."""

import subprocess
import sys
from pathlib import Path

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


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "samplerbench"
    result = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "heun" in result.stdout
