"""examples/profile_trainer.py runs as documented: Trainer + PEFT LoRA on a tiny Llama,
profiled by ProfilerCallback, opened with `paca-prof analyze`."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, checkout_env

from paca_prof import trace


def test_the_example_runs_and_analyze_opens_its_trace(tmp_path):
    out = tmp_path / "trace"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "profile_trainer.py"),
                           "--out", str(out), "--steps", "5"], capture_output=True, text=True,
                          env=checkout_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trace: {out}" in done.stdout
    assert "batches the model saw in the active steps" in done.stdout  # analyze's output
    loaded = trace.load(out)
    assert loaded.summary["method"].tolist() == ["lora"]
    assert loaded.run["recipe"]["grad_accum"] == 2 and loaded.run["recipe"]["grad_ckpt"]
    assert loaded.batches["padding_tokens"].sum() > 0  # uneven lengths, padded
