"""examples/profile_trainer.py runs as documented: Trainer + PEFT LoRA on a tiny Llama,
profiled by ProfilerCallback, opened with `paca-prof analyze`."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, checkout_env

from paca_prof import trace


def test_the_example_runs_and_analyze_opens_its_trace(tmp_path):
    out = tmp_path / "trace"
    temp = tmp_path / "temp"  # the process's temp dir: what it leaves there is seen
    temp.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "profile_trainer.py"),
                           "--out", str(out), "--steps", "5"], capture_output=True, text=True,
                          env={**checkout_env(), "TMPDIR": str(temp)}, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(p.name.startswith("paca-prof-example") for p in temp.iterdir())
    assert f"trace: {out}" in done.stdout
    assert "batches the model saw in the active steps" in done.stdout  # analyze's output
    loaded = trace.load(out)
    assert loaded.summary["method"].tolist() == ["lora"]
    assert loaded.run["recipe"]["grad_accum"] == 2 and loaded.run["recipe"]["grad_ckpt"]
    assert loaded.batches["padding_tokens"].sum() > 0  # uneven lengths, padded


def test_the_examples_bad_arguments_get_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    for argv, message in ((["--steps", "3"], "--steps must be from 4"),
                          (["--steps", "10**9"], "invalid int value"),
                          (["--steps", str(10**9)], "to 1000, got 1000000000"),
                          (["--out", str(tmp_path / "taken")], "already exists")):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "profile_trainer.py"),
                               *argv], capture_output=True, text=True, env=checkout_env(),
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
