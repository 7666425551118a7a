"""The consumer half never imports torch: the analyzer, the HTML report, the dashboard's app,
`paca-prof analyze` and `paca-prof --help` all run in a process where torch, transformers and
PEFT cannot be imported (a meta-path finder refuses them), as DESIGN.md's one-way flow says."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, checkout_env

BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers", "peft"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Refuse())
""")
SAMPLE = ROOT / "traces" / "sample-llama3-8b-seq4096-a100-80gb"


def run_without_torch(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=tmp_path,
                          env=checkout_env(), capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks(tmp_path):
    done = run_without_torch("import torch", tmp_path)
    assert done.returncode != 0 and "blocked in this test" in done.stderr


def test_analyzer_report_and_dashboard_without_torch(tmp_path):
    done = run_without_torch(f"""
        from paca_prof.analyze import TraceAnalysis
        from paca_prof.analyze.report import write_html
        from dashboards.app import create_app

        analysis = TraceAnalysis({str(SAMPLE)!r})
        assert len(analysis.summary()) == 5 and len(analysis.adapter_overhead()) == 5
        write_html(analysis, "report.html")
        app = create_app({str(SAMPLE.parent)!r}, preload=False)
        print("done", type(app).__name__)
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["done", "Dash"]
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("argv", [["--help"], ["analyze", str(SAMPLE)], ["plan", "--help"],
                                  ["--version"]])
def test_commands_that_read_traces_or_print_help_run_without_torch(tmp_path, argv):
    done = run_without_torch(f"""
        import sys
        from paca_prof.cli import main
        sys.exit(main({argv!r}))
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
