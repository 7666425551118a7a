"""Hostile input: every argument, config file and trace folder from outside gets one clear line
and exit status 2 (ValueError or TraceError in the library), never a traceback, a hang or a
changed file. Property-based tests (Hypothesis) for the size parser and the trace loader.
The dashboard's HTTP requests have their own hostile suite in the dashboard tests."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paca_prof import trace
from paca_prof.budget import parse_headroom
from paca_prof.cli import main
from paca_prof.units import MAX_BYTES, parse_bytes

TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64}


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def one_line_exit_2(capsys, argv) -> str:
    """Run the command in process; assert the one-line usage error; return the line."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, (argv, rc, captured.err[-1000:])
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paca-prof: error: "), captured.err
    return lines[0]


# --- arguments ----------------------------------------------------------------------------------

RUN = ["run", "--model", "tiny", "--device", "meta"]
PLAN = ["plan", "--model", "tiny"]


@pytest.mark.parametrize("argv, expected", [
    (RUN + ["--seq", "0"], "--seq"),
    (RUN + ["--seq", "-5"], "--seq"),
    (RUN + ["--seq", "abc"], "--seq"),
    (RUN + ["--seq", str(2**40)], "--seq"),
    (RUN + ["--seq", "8", "--batch", "0"], "--batch"),
    (RUN + ["--seq", "65536", "--batch", "65536"], "--batch x --seq"),
    (RUN + ["--seq", "8", "--alpha", "nan"], "finite"),
    (RUN + ["--seq", "8", "--alpha", "inf"], "finite"),
    (RUN + ["--seq", "8", "--alpha", "-1"], "alpha"),
    (RUN + ["--seq", "8", "--alpha", "abc"], "not a number"),
    (RUN + ["--seq", "8", "--dropout", "1.0"], "dropout"),
    (RUN + ["--seq", "8", "--dropout", "nan"], "finite"),
    (RUN + ["--seq", "8", "--dropout", "-0.1"], "dropout"),
    (RUN + ["--seq", "8", "--r", "0"], "--r"),
    (RUN + ["--seq", "8", "--rank", "100000"], "rank"),
    (RUN + ["--seq", "8", "--seed", "-1"], "seed"),
    (RUN + ["--seq", "8", "--seed", str(2**64)], "seed"),
    (RUN + ["--seq", "8", "--methods", "lora,lora"], "named twice"),
    (RUN + ["--seq", "8", "--methods", "lora,bogus"], "unknown method 'bogus'"),
    (RUN + ["--seq", "8", "--methods", ","], "no method"),
    (RUN + ["--seq", "8", "--steps", "0"], "--steps"),
    (RUN + ["--seq", "8", "--warmup", "-1"], "--warmup"),
    (["run", "--model", "tiny", "--seq", "8", "--device", "tpu"], "invalid choice"),
    (RUN + ["--seq", "8", "--targets", "q_proj,bogus"], "its linears are named ['down_proj'"),
    (RUN + ["--seq", "8", "--targets", ","], "no target"),
    (RUN + ["--seq", "8", "--fsdp", "--world-size", "0"], "--world-size"),
    (RUN + ["--seq", "8", "--fsdp", "--world-size", "-2"], "--world-size"),
    (RUN + ["--seq", "8", "--world-size", "2"], "give --fsdp too"),
    (RUN + ["--seq", "8", "--no-reshard-after-forward"], "give --fsdp too"),
    (RUN + ["--seq", "8", "--fsdp", "--backend", "mpi"], "invalid choice"),
    (RUN + ["--seq", "8", "--fsdp", "--interconnect", "carrier-pigeon"], "invalid choice"),
    (["run", "--model", "tiny", "--seq", "8", "--device", "cpu", "--fsdp"],
     "needs a distributed launch"),
    (["run", "--model", "tiny", "--seq", "8", "--device", "cpu", "--world-size", "2"],
     "needs torchrun"),
    (PLAN + ["--gpu", "h100-80gb", "--fsdp", "--world-size", "0"], "--world-size"),
    (RUN + ["--seq", "8", "--loss", "focal"], "invalid choice: 'focal'"),
    (RUN + ["--seq", "8", "--loss-chunks", "0"], "--loss-chunks"),
    (RUN + ["--seq", "8", "--optimizer", "lion"], "invalid choice: 'lion'"),
    (RUN + ["--seq", "8", "--grad-accum", "0"], "--grad-accum"),
    (RUN + ["--seq", "8", "--max-grad-norm", "-1"], "--max-grad-norm"),
    (RUN + ["--seq", "8", "--max-grad-norm", "nan"], "finite"),
    (RUN + ["--seq", "8", "--quantize", "targets"], "none of them is in --methods"),
    (RUN + ["--seq", "8", "--amp", "--dtype", "fp32"], "give bf16 or fp16"),
    (PLAN + ["--gpu", "l4", "--targets", "bogus"], "its linears are named"),
    (PLAN + ["--gpu", "l4", "--optimizer", "lion"], "invalid choice: 'lion'"),
    (["run", "--model", "tiny", "--seq", "8", "--device", "cpu", "--attention", "flash"],
     "does not run on the CPU"),
    (RUN + ["--seq", "8", "--gpu", "a100-90gb"], "unknown GPU"),
    (RUN + ["--seq", "8", "--gpu", "missing.yaml"], "does not exist"),
    (RUN + ["--seq", "8", "--headroom", "150%"], "headroom"),
    (RUN + ["--seq", "8", "--headroom", "1e99999999"], "cannot read"),
    (["run", "--model", "gemma2-9b", "--seq", "8", "--device", "meta", "--attention", "flash"],
     "needs eager"),
    (PLAN + ["--memory", "1e400"], "cannot read"),
    (PLAN + ["--memory", "1e99999999"], "cannot read"),
    (PLAN + ["--memory=-1GiB"], "cannot read"),
    (PLAN + ["--memory", "0"], "positive"),
    (PLAN + ["--memory", "2EiB"], "cannot read"),
    (PLAN + ["--memory", "1e30"], "largest"),
    (PLAN + ["--gpu", "l4", "--headroom", "1e400"], "cannot read"),
    (PLAN + ["--gpu", "l4", "--headroom", "x%"], "percentage"),
    (PLAN + ["--gpu", "l4", "--headroom", "+".join(["1"] * 20)], "terms"),
    (PLAN + ["--gpu", "l4", "--seq", "8", "--batch", "2"], "leave out --batch"),
    (PLAN + ["--gpu", "l4", "--time-budget", "nan"], "finite"),
    (PLAN + ["--gpu", "l4", "--time-budget", "-1"], "0 or more"),
    (["calibrate", "--device", "tpu"], "invalid choice"),
    (["calibrate", "--out", "spec.txt"], "a device spec is a .yaml file"),
    (["calibrate", "--out", "no-such-folder/spec.yaml"], "no folder no-such-folder"),
    (["calibrate", "--out", "."], "a device spec is a .yaml file"),
    (["calibrate", "--threads", "0"], "--threads"),
    (["calibrate", "--threads", "99999"], "--threads must be at most 4096"),
    (["calibrate", "--name", "x" * 100], "--name must be a string of at most 64"),
    (RUN + ["--seq", "8", "--threads", "0"], "--threads"),
    (RUN + ["--seq", "8", "--threads", "two"], "--threads"),
    (RUN + ["--seq", "8", "--threads", "100000"], "--threads must be at most 4096"),
    (RUN + ["--seq", "8", "--time-budget", "0"], "--time-budget must be above 0"),
    (RUN + ["--seq", "8", "--time-budget", "-3"], "--time-budget must be above 0"),
    (RUN + ["--seq", "8", "--time-budget", "nan"], "finite"),
    (RUN + ["--seq", "8", "--time-budget", "1e9"], "--time-budget must be at most"),
    (RUN + ["--seq", "8", "--time-budget", "soon"], "not a number"),
    (["dash", "--port", "70000"], "65535"),
    (["dash", "--port", "0"], "positive"),
    (["dash", "no-such-folder"], "no such traces folder"),
    (["run", "--model", "llama9-1t", "--seq", "8"], "unknown model"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    line = one_line_exit_2(capsys, argv)
    assert expected in line, line
    assert not (tmp_path / "traces").exists()


def test_calibrate_refuses_to_overwrite_a_spec_and_cuda_where_there_is_none(capsys, tmp_path):
    existing = tmp_path / "spec.yaml"
    existing.write_text("keep me")
    line = one_line_exit_2(capsys, ["calibrate", "--out", str(existing)])
    assert "exists; give --force" in line and existing.read_text() == "keep me"
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert "is a folder" in one_line_exit_2(capsys, ["calibrate", "--out", str(folder)])
    import torch

    if not torch.cuda.is_available():
        line = one_line_exit_2(capsys, ["calibrate", "--device", "cuda"])
        assert "no CUDA device is available" in line


def test_dash_debug_refuses_every_interface(capsys, tmp_path):
    line = one_line_exit_2(capsys, ["dash", str(tmp_path), "--debug", "--host", "0.0.0.0"])
    assert "loopback" in line


def test_dash_on_a_port_in_use_is_one_line(capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = one_line_exit_2(capsys, ["dash", str(tmp_path), "--port", port])
    assert f"cannot serve on 127.0.0.1:{port}" in line and "in use" in line


def test_bad_output_folders(capsys, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    long_name = tmp_path / ("x" * 300)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for out, expected in ((existing, "exists"), (long_name, "bytes"),
                          (a_file / "under", "file.txt")):
        line = one_line_exit_2(capsys, RUN + ["--seq", "8", "--out", str(out)])
        assert expected in line, line
    assert (existing / "keep.txt").read_text() == "mine" and a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "file.txt"]


BASE_SPEC = ("name: x\nmemory_bytes: 1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
             "hbm_gbps: 1\n")


@pytest.mark.parametrize("content, expected", [
    ("name: x\n", "missing field"),
    ("- a list\n", "mapping"),
    ("{not yaml", "not YAML"),
    ("name: x\nmemory_bytes: 1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
     "hbm_gbps: .nan\n", "finite"),
    ("name: x\nmemory_bytes: 1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
     "hbm_gbps: nan\n", "must be a number"),
    ("name: x\nmemory_bytes: -1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
     "hbm_gbps: 1\n", "memory_bytes"),
    ("name: x\nmemory_bytes: 1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
     "hbm_gbps: 1\nwarp_drive: 9\n", "unknown field"),
    ("name: {a: 1}\nmemory_bytes: 1\nbf16_tflops: 1\nfp16_tflops: 1\nfp32_tflops: 1\n"
     "hbm_gbps: 1\n", "string"),
    # an integer too large for a float, and one too long for Python's int-to-text limit
    ("name: x\nmemory_bytes: 1" + "0" * 400 + "\nbf16_tflops: 1\nfp16_tflops: 1\n"
     "fp32_tflops: 1\nhbm_gbps: 1\n", "memory_bytes must be at most"),
    ("name: x\nmemory_bytes: 1\nbf16_tflops: 1" + "0" * 5000 + "\nfp16_tflops: 1\n"
     "fp32_tflops: 1\nhbm_gbps: 1\n", "integer string conversion"),
    # rate curves: pairs, sizes positive and increasing, efficiencies at most 1, bounded length
    (BASE_SPEC + "matmul_curve: 3\n", "matmul_curve must be a list"),
    (BASE_SPEC + "matmul_curve: [[1, 0.5, 2]]\n", "matmul_curve[0] must be a [size, rate]"),
    (BASE_SPEC + "matmul_curve: [[1, 1.5]]\n", "matmul_curve[0] rate"),
    (BASE_SPEC + "bandwidth_curve: [[0, 10]]\n", "bandwidth_curve[0] size"),
    (BASE_SPEC + "bandwidth_curve: [[2, 10], [1, 20]]\n", "sizes must increase"),
    (BASE_SPEC + "bandwidth_curve: [[1, .nan]]\n", "finite"),
    (BASE_SPEC + "bandwidth_curve: [" + ", ".join(f"[{i}, 1]" for i in range(1, 100))
     + "]\n", "at most 64"),
    (BASE_SPEC + "mixed_layout_bandwidth_curve: [[1, -2]]\n",
     "mixed_layout_bandwidth_curve[0] rate"),
])
def test_bad_gpu_spec_files(capsys, tmp_path, content, expected):
    spec = tmp_path / "gpu.yaml"
    spec.write_text(content)
    line = one_line_exit_2(capsys, RUN + ["--seq", "8", "--gpu", str(spec)])
    assert expected in line, line


def test_gpu_spec_that_is_not_a_regular_file(capsys, tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    assert "not a regular file" in one_line_exit_2(
        capsys, RUN + ["--seq", "8", "--gpu", str(tmp_path / "dir.yaml")])
    os.mkfifo(tmp_path / "fifo.yaml")
    assert "not a regular file" in one_line_exit_2(
        capsys, RUN + ["--seq", "8", "--gpu", str(tmp_path / "fifo.yaml")])


# --- model configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (json.dumps([1, 2]), "not an object"),
    (json.dumps("a string"), "not an object"),
    ("{not json", "not JSON"),
    ("", "not JSON"),
    (json.dumps({**TINY_CONFIG, "model_type": None}), "no model_type"),
    (json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "model_type"}), "no model_type"),
    (json.dumps({**TINY_CONFIG, "model_type": "warp"}), "not a causal language model"),
    (json.dumps({**TINY_CONFIG, "model_type": "t5"}), "not a causal language model"),
    (json.dumps({**TINY_CONFIG, "hidden_size": 66}), "not a multiple"),
    (json.dumps({**TINY_CONFIG, "hidden_size": -64}), "hidden_size"),
    (json.dumps({**TINY_CONFIG, "vocab_size": 0}), "vocab_size"),
    (json.dumps({**TINY_CONFIG, "vocab_size": 2**30}), "vocab_size"),
    (json.dumps({**TINY_CONFIG, "num_hidden_layers": 0}), "num_hidden_layers"),
    (json.dumps({**TINY_CONFIG, "num_key_value_heads": 3}), "multiple"),
    (json.dumps({**TINY_CONFIG, "num_attention_heads": "four"}), "num_attention_heads"),
])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_model_configs(capsys, tmp_path, content, expected, command):
    (tmp_path / "config.json").write_text(content)
    argv = ([command, "--model", str(tmp_path), "--seq", "8", "--device", "meta"]
            if command == "run" else [command, "--model", str(tmp_path), "--memory", "8GiB"])
    line = one_line_exit_2(capsys, argv)
    assert expected in line, line


def test_configs_that_are_not_regular_small_files(capsys, tmp_path):
    fifo = tmp_path / "fifo" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_exit_2(
        capsys, RUN[:2] + [str(fifo.parent), "--seq", "8"])
    zero = tmp_path / "zero" / "config.json"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")
    assert "not a regular file" in one_line_exit_2(
        capsys, RUN[:2] + [str(zero.parent), "--seq", "8"])
    big = tmp_path / "big" / "config.json"
    big.parent.mkdir()
    big.write_text(json.dumps({**TINY_CONFIG, "padding": "x" * (5 * 2**20)}))
    assert "larger than" in one_line_exit_2(capsys, RUN[:2] + [str(big.parent), "--seq", "8"])


# --- trace folders ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_trace(tmp_path_factory):
    """A small valid trace folder (simulated, two methods) to break in copies."""
    from paca_prof.engines import run as run_engines
    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    out = tmp_path_factory.mktemp("hostile") / "good"
    spec = RunSpec(model="tiny", seq=16, dtype="bf16", device="meta", methods=("lora", "paca"),
                   recipe=Recipe(attention="flash"))
    return run_engines(spec, out, "pytest")


def _copy(good_trace, tmp_path, name="broken"):
    copy = tmp_path / "traces" / name
    shutil.copytree(good_trace, copy)
    return copy


def _edit_run(folder, **changes):
    run = yaml.safe_load((folder / "run.yaml").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            run.pop(key)
        else:
            run[key] = value
    (folder / "run.yaml").write_text(yaml.safe_dump(run))


_DELETE = object()
IFRAME = {"type": "Iframe", "namespace": "dash_html_components",
          "props": {"srcDoc": "<script>alert(1)</script>"}}
RUN_YAML_CASES = {
    "command-is-a-component": (dict(command=IFRAME), "command is a dict"),
    "model-name-is-a-mapping": (dict(model={"name": IFRAME, "config": {}}), "model.name"),
    "methods-with-integer-keys": (dict(methods={1: {"method": "lora"}}), "methods"),
    "no-model": (dict(model=_DELETE), "no model"),
    "seq-is-a-string": (dict(seq="long"), "seq is a str"),
    "batch-is-a-bool": (dict(batch=True), "batch is a bool"),
    "unknown-source": (dict(source="guessed"), "source"),
    "schema-2": (dict(schema_version=2), "schema_version 2"),
    "device-is-a-list": (dict(device=["gpu"]), "device is a list"),
    "device-memory-a-string": (dict(device={"type": "meta", "name": "x", "memory_bytes": "8"}),
                               "memory_bytes"),
    "bad-sources": (dict(sources={"time": "guessed", "bytes": "simulated"}), "sources.time"),
}


@pytest.mark.parametrize("case", list(RUN_YAML_CASES))
def test_malformed_run_yaml(capsys, good_trace, tmp_path, case):
    changes, expected = RUN_YAML_CASES[case]
    folder = _copy(good_trace, tmp_path)
    _edit_run(folder, **changes)
    with pytest.raises(trace.TraceError, match=expected):
        trace.load(folder)
    assert expected in one_line_exit_2(capsys, ["analyze", str(folder)])


@pytest.mark.parametrize("content, expected", [
    ("a: &x [1, 2]\nb: *x\n", "aliases"),
    ("{{{ not: [yaml", "unreadable run.yaml"),
    ("just a sentence\n", "not a mapping"),
    ("\xff\xfe\x00binary", "unreadable run.yaml"),
    ("", "not a mapping"),
])
def test_run_yaml_that_is_not_one(capsys, good_trace, tmp_path, content, expected):
    folder = _copy(good_trace, tmp_path)
    (folder / "run.yaml").write_bytes(content.encode("utf-8", "surrogateescape")
                                      if isinstance(content, str) else content)
    assert expected in one_line_exit_2(capsys, ["analyze", str(folder)])


def test_files_that_are_not_regular_files_inside_the_folder(capsys, good_trace, tmp_path):
    outside = tmp_path / "outside.yaml"
    shutil.copy(good_trace / "run.yaml", outside)
    cases = {
        "run-yaml-links-out": ("run.yaml", lambda p: p.symlink_to(outside), "leaves"),
        "run-yaml-dev-zero": ("run.yaml", lambda p: p.symlink_to("/dev/zero"), "leaves"),
        "run-yaml-fifo": ("run.yaml", os.mkfifo, "not a regular file"),
        "run-yaml-folder": ("run.yaml", lambda p: p.mkdir(), "not a regular file"),
        "summary-folder": ("summary.parquet", lambda p: p.mkdir(), "not a regular file"),
        "ops-fifo": ("ops.parquet", os.mkfifo, "not a regular file"),
        "layers-links-out": ("layers.parquet",
                             lambda p: p.symlink_to(good_trace / "layers.parquet"), "leaves"),
        "memory-missing": ("memory.parquet", lambda p: None, "does not exist"),
    }
    for name, (file, make, expected) in cases.items():
        folder = _copy(good_trace, tmp_path, name)
        (folder / file).unlink()
        make(folder / file)
        assert expected in one_line_exit_2(capsys, ["analyze", str(folder)]), name


def _rewrite_summary(folder, edit):
    table = pd.read_parquet(folder / "summary.parquet")
    edit(table).to_parquet(folder / "summary.parquet")


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.drop(columns="status"), "no status column"),
    (lambda t: t.iloc[0:0], "no rows"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "twice: lora"),
    (lambda t: t.assign(status="fine"), "unknown status"),
    (lambda t: t.assign(peak_bytes="lots"), "wrong type"),
])
def test_malformed_tables(capsys, good_trace, tmp_path, edit, expected):
    folder = _copy(good_trace, tmp_path)
    _rewrite_summary(folder, edit)
    assert expected in one_line_exit_2(capsys, ["analyze", str(folder)])


def test_truncated_and_oversized_parquet(capsys, good_trace, tmp_path, monkeypatch):
    folder = _copy(good_trace, tmp_path, "truncated")
    data = (folder / "ops.parquet").read_bytes()
    (folder / "ops.parquet").write_bytes(data[: len(data) // 2])
    assert "unreadable ops.parquet" in one_line_exit_2(capsys, ["analyze", str(folder)])
    folder = _copy(good_trace, tmp_path, "many-rows")
    monkeypatch.setattr(trace, "TABLE_ROWS_LIMIT", 10)
    assert "too large to load" in one_line_exit_2(capsys, ["analyze", str(folder)])


def test_an_unfinished_write_is_not_a_trace(capsys, good_trace, tmp_path):
    folder = _copy(good_trace, tmp_path, trace.STAGING_PREFIX + "abc123")
    assert "unfinished write" in one_line_exit_2(capsys, ["analyze", str(folder)])


def test_a_chrome_trace_that_links_out_is_not_offered(good_trace, tmp_path):
    folder = _copy(good_trace, tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (folder / "trace-lora.json").symlink_to(secret)
    (folder / "trace-paca.json").write_text("{}")
    assert set(trace.load(folder).chrome_traces) == {"paca"}


def test_report_is_never_written_over_a_trace_or_a_file(capsys, good_trace, tmp_path):
    folder = _copy(good_trace, tmp_path)
    before = _snapshot(folder)
    for target in (folder / "run.yaml", folder / "report.html"):
        assert "inside a trace folder" in one_line_exit_2(
            capsys, ["analyze", str(folder), "--html", str(target)])
    existing = tmp_path / "report.html"
    existing.write_text("keep")
    assert "--force" in one_line_exit_2(
        capsys, ["analyze", str(folder), "--html", str(existing)])
    assert existing.read_text() == "keep" and _snapshot(folder) == before
    assert main(["analyze", str(folder), "--html", str(existing), "--force"]) == 0
    assert existing.read_text().startswith("<!doctype html>")


def test_analyze_a_method_the_trace_lacks(capsys, good_trace):
    assert "not in trace" in one_line_exit_2(capsys, ["analyze", str(good_trace), "--methods",
                                                      "dora"])


# --- properties ---------------------------------------------------------------------------------

UNITS = ["", "b", "k", "KiB", "m", "MiB", "g", "GiB", "t", "TiB", "KB", "MB", "GB", "TB"]


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=1000)
def test_parse_bytes_takes_any_text_and_either_reads_it_or_says_why(text):
    try:
        value = parse_bytes(text)
    except ValueError as error:
        assert "\n" not in str(error)
    else:
        assert 0 <= value <= MAX_BYTES


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(UNITS))
def test_parse_bytes_reads_every_unit_exactly(number, unit):
    factor = parse_bytes(f"1{unit}")
    assert parse_bytes(f"{number}{unit}") == number * factor
    assert parse_bytes(f" {number} {unit.upper()} ") == number * factor


@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(UNITS))
@settings(deadline=1000)
def test_parse_bytes_of_any_float_text_is_bounded(number, unit):
    try:
        value = parse_bytes(f"{number}{unit}")
    except ValueError:
        return
    assert 0 <= value <= MAX_BYTES


@given(st.text(alphabet="0123456789.e+-%GiMBk ", max_size=40))
@settings(max_examples=300, deadline=1000)
def test_parse_headroom_reads_or_refuses_in_one_line(text):
    try:
        value = parse_headroom(text, 80 * 2**30)
    except ValueError as error:
        assert "\n" not in str(error)
    else:
        assert 0 <= value < 80 * 2**30


@given(st.binary(max_size=2000), st.sampled_from(["run.yaml", "summary.parquet",
                                                  "ops.parquet"]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_loader_refuses_any_garbage_with_a_trace_error(good_trace, tmp_path_factory, data,
                                                           name):
    folder = tmp_path_factory.mktemp("garbage") / "t"
    shutil.copytree(good_trace, folder)
    (folder / name).write_bytes(data)
    try:
        trace.load(folder)
    except trace.TraceError as error:
        assert "\n" not in str(error)


@given(st.dictionaries(st.sampled_from(sorted(trace.RUN_KEYS) + ["extra"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                                 st.lists(st.integers(), max_size=3),
                                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=3)),
                       max_size=12))
@settings(max_examples=300, deadline=None)
def test_validate_run_accepts_or_refuses_any_mapping_in_one_line(values):
    try:
        trace.validate_run({"schema_version": 1, **values})
    except trace.TraceError as error:
        assert "\n" not in str(error)


@pytest.mark.parametrize("env, argv, expected", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["--fsdp", "--world-size", "3"],
     "does not match torchrun's WORLD_SIZE 2"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, [], "give --fsdp"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, ["--fsdp"], "not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, ["--fsdp"], "out of range"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["--fsdp", "--backend", "gloo"], "--backend is for"),
])
def test_a_distributed_launch_that_does_not_match_is_one_line(capsys, monkeypatch, env, argv,
                                                              expected):
    """torchrun's environment against the flags: checked before any process group starts."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = one_line_exit_2(capsys, ["run", "--model", "tiny", "--seq", "8", "--device", "cpu",
                                    *argv])
    assert expected in line, line


def test_a_simulated_run_under_torchrun_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = one_line_exit_2(capsys, RUN + ["--seq", "8", "--fsdp", "--world-size", "2"])
    assert "without torchrun" in line, line
