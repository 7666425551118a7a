"""The paca-prof command: --json output, user errors (one line, exit 2), --model paths."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, checkout_env

from paca_prof import trace
from paca_prof.cli import main

# The cheapest real run: two methods, a few tokens, one step.
SMALL = ["--device", "cpu", "--seq", "8", "--batch", "1", "--steps", "1", "--warmup", "0"]


def _console_script() -> str:
    """The installed paca-prof script, checked to run this checkout's code: it runs this
    interpreter, and under checkout_env() this interpreter imports paca_prof from here (not
    from another checkout's editable install)."""
    script = Path(sysconfig.get_path("scripts")) / "paca-prof"
    if not script.exists():
        script = Path(sys.executable).parent / "paca-prof"
    assert script.exists(), "the paca-prof console script is not installed (pip install -e .)"
    shebang = script.read_text().splitlines()[0].removeprefix("#!").strip()
    assert Path(shebang).resolve() == Path(sys.executable).resolve(), shebang
    where = subprocess.run([sys.executable, "-c", "import paca_prof; print(paca_prof.__file__)"],
                           capture_output=True, text=True, env=_env(), check=True).stdout
    assert Path(where.strip()).resolve().is_relative_to(ROOT), where
    return str(script)


def _env() -> dict[str, str]:
    return checkout_env()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, float]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_usage_error(rc: int, out: str, err: str) -> str:
    assert rc == 2, (rc, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("paca-prof: error: "), lines[0]
    return lines[0]


# --- --json, through the installed console script -----------------------------------------------

def test_console_script_json_output(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [_console_script(), "run", "--model", "tiny", "--methods", "frozen,paca", *SMALL,
         "--out", str(out), "--json"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    document = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert set(document) == {"trace", "methods"}
    assert Path(document["trace"]) == out
    assert list(document["methods"]) == ["frozen", "paca"]
    loaded = trace.load(out)
    summary = loaded.summary.set_index("method")
    expected_keys = set(trace.SUMMARY_COLUMNS) - {"method"}
    for method, row in document["methods"].items():
        assert expected_keys <= set(row), method
        assert row["status"] == "ok", method
        assert row["error"] is None
        assert row["step_ms"] == pytest.approx(summary.loc[method, "step_ms"])
        assert row["n_kernels"] == summary.loc[method, "n_kernels"]
        assert row["peak_bytes"] == summary.loc[method, "peak_bytes"]
        assert isinstance(row["trainable_params"], int)
    assert document["methods"]["frozen"]["trainable_params"] == 0
    assert document["methods"]["paca"]["trainable_params"] > 0
    assert loaded.run["command"].startswith("paca-prof run --model tiny")
    assert loaded.run["seq"] == 8 and loaded.run["dtype"] == "fp32"


def test_module_entry_point_user_error(tmp_path):
    """A user error from a real process: one line on stderr, exit 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "paca_prof.cli", "run", "--model", "tiny", "--seq", "0"],
        capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    line = _assert_usage_error(proc.returncode, proc.stdout, proc.stderr)
    assert "--seq" in line
    assert not (tmp_path / "traces").exists()


# --- user errors, in process ----------------------------------------------------------------------

def _run_main(capsys, *args) -> tuple[int, str, str]:
    rc = main(["run", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_unknown_model_lists_presets(capsys, tmp_path):
    from paca_prof.presets import MODEL_PRESETS

    rc, out, err = _run_main(capsys, "--model", "gpt-17", "--seq", "8", "--out",
                             str(tmp_path / "o"))
    line = _assert_usage_error(rc, out, err)
    assert "gpt-17" in line
    for preset in MODEL_PRESETS:
        assert preset in line, preset
    assert list(tmp_path.iterdir()) == []


def test_unknown_method(capsys, tmp_path):
    rc, out, err = _run_main(capsys, "--model", "tiny", "--seq", "8", "--methods", "lora,qlorax",
                             "--out", str(tmp_path / "o"))
    line = _assert_usage_error(rc, out, err)
    assert "qlorax" in line and "paca" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, word", [
    (["--seq", "0"], "--seq"),
    (["--seq", "-5"], "--seq"),
    (["--seq", "abc"], "--seq"),
    (["--seq", "8", "--batch", "-1"], "--batch"),
    (["--seq", "8", "--batch", "0"], "--batch"),
    (["--seq", "8", "--steps", "0"], "--steps"),
    (["--seq", "8", "--warmup", "-1"], "warmup"),
    (["--seq", "8", "--dropout", "1.5"], "dropout"),
    (["--seq", "8", "--rank", "100000"], "rank"),
    (["--seq", "8", "--rank", "0"], "--rank"),
])
def test_bad_numbers(capsys, tmp_path, args, word):
    rc, out, err = _run_main(capsys, "--model", "tiny", *args, "--out", str(tmp_path / "o"))
    line = _assert_usage_error(rc, out, err)
    assert word in line, line
    assert not (tmp_path / "o").exists()


def test_missing_required_arguments(capsys):
    rc, out, err = _run_main(capsys, "--model", "tiny")
    line = _assert_usage_error(rc, out, err)
    assert "--seq" in line


def test_unwritable_output(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for target in (a_file / "sub", a_file / "sub" / "deeper"):
        rc, out, err = _run_main(capsys, "--model", "tiny", *SMALL, "--methods", "frozen",
                                 "--out", str(target))
        line = _assert_usage_error(rc, out, err)
        assert "file.txt" in line, line
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_existing_output_is_not_touched(capsys, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    (existing / "run.yaml").write_text("schema_version: 1\n")
    before = _snapshot(existing)
    rc, out, err = _run_main(capsys, "--model", "tiny", *SMALL, "--methods", "frozen",
                             "--out", str(existing))
    line = _assert_usage_error(rc, out, err)
    assert "exists" in line
    assert _snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_bad_config_json(capsys, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rc, out, err = _run_main(capsys, "--model", str(broken), "--seq", "8",
                             "--out", str(tmp_path / "o"))
    assert "broken.json" in _assert_usage_error(rc, out, err)
    no_type = tmp_path / "notype" / "config.json"
    no_type.parent.mkdir()
    no_type.write_text(json.dumps({"hidden_size": 64}))
    rc, out, err = _run_main(capsys, "--model", str(no_type.parent), "--seq", "8",
                             "--out", str(tmp_path / "o"))
    _assert_usage_error(rc, out, err)
    assert not (tmp_path / "o").exists()


# --- --model given as a config.json or a folder holding one ---------------------------------------

@pytest.fixture(scope="module")
def tiny_config_folder(tmp_path_factory):
    from paca_prof.presets import load_config

    _, config = load_config("tiny")
    folder = tmp_path_factory.mktemp("models") / "my-tiny"
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    return folder


@pytest.mark.parametrize("as_file", [True, False], ids=["config.json", "folder"])
def test_model_from_local_config(capsys, tmp_path, tiny_config_folder, as_file):
    from paca_prof.presets import MODEL_PRESETS

    model = tiny_config_folder / "config.json" if as_file else tiny_config_folder
    out = tmp_path / "run"
    rc = main(["run", "--model", str(model), "--methods", "frozen", *SMALL, "--out", str(out),
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    document = json.loads(captured.out)
    assert document["methods"]["frozen"]["status"] == "ok"
    run = trace.load(out).run
    assert run["model"]["name"] == "my-tiny"
    config = run["model"]["config"]
    for key, value in MODEL_PRESETS["tiny"].items():
        assert config[key] == value, key


# --- timing spread and throughput in the printed table ------------------------------------------

def test_run_prints_the_spread_and_one_warning_per_untrusted_method(capsys, tmp_path):
    """A measured run prints each method's median step with its p25-p75, the ratio to lora
    with its interval, throughput, and one WARNING line per method whose summary carries a
    spread warning (whatever the load made of them); --threads is recorded."""
    out = tmp_path / "run"
    rc = main(["run", "--model", "tiny", "--methods", "lora,paca", "--device", "cpu", "--seq",
               "8", "--steps", "3", "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    loaded = trace.load(out)
    assert loaded.run["timing"]["threads"] == 1
    assert loaded.run["timing"]["threads_from"] == "--threads"
    assert "spread (measured)" in printed
    summary = loaded.summary.set_index("method")
    for method, row in summary.iterrows():
        line = next(line for line in printed.splitlines() if line.startswith(method + " ")
                    and "[" in line)
        assert f"{row['step_ms']:.1f} [{row['step_ms_p25']:.1f}-" in line
        assert f"{row['step_ratio']:.2f} [{row['step_ratio_lo']:.2f}," in line
    warned = [m for m, w in summary["spread_warning"].items() if w]
    lines = [line for line in printed.splitlines() if line.startswith("WARNING: ")]
    assert [line.split(":")[1].strip() for line in lines] == warned


def test_a_projected_run_has_throughput_and_mfu(capsys, tmp_path):
    out = tmp_path / "run"
    rc = main(["run", "--model", "tiny", "--methods", "lora,paca", "--device", "meta",
               "--seq", "64", "--gpu", "h100-80gb", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "throughput (projected): MFU against h100-80gb's peak" in printed
    summary = trace.load(out).summary
    assert (summary["mfu"] > 0).all() and (summary["mfu"] <= 1).all()
    assert summary["step_ms_p25"].isna().all() and summary["spread_warning"].isna().all()
    tokens = 64
    for _, row in summary.iterrows():
        assert row["tokens_per_s"] == pytest.approx(tokens / (row["step_ms"] / 1e3))
        assert row["achieved_tflops"] == pytest.approx(row["mfu"] * 989.0)


def test_a_simulated_run_says_which_limit_decided_ok_and_oom(capsys, tmp_path):
    """The ok/oom verdict of a simulated run is stated with the budget that decided it, the
    planner's: the GPU's memory less its CUDA context less the headroom."""
    from paca_prof.budget import make_budget

    for headroom, status in (("512MiB+1%", "ok"), ("79.499GiB", "oom")):
        out = tmp_path / f"run-{status}"
        rc = main(["run", "--model", "tiny", "--methods", "lora", "--device", "meta", "--seq",
                   "64", "--gpu", "a100-80gb", "--headroom", headroom, "--out", str(out)])
        assert rc == 0
        budget = make_budget(gpu="a100-80gb", headroom=headroom)
        lines = [line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("ok/oom: ")]
        expected = (f"ok/oom: simulated reserved memory against "
                    f"{budget.describe(meaning=False)} (paca-prof plan's budget)")
        assert lines == [expected]
        assert "a100-80gb: 80.00 GiB - CUDA context 512.00 MiB - headroom" in lines[0]
        summary = trace.load(out).summary.set_index("method")
        assert summary.loc["lora", "status"] == status
        assert (summary.loc["lora", "reserved_bytes"] <= budget.budget_bytes) == (status == "ok")
