"""The trace folder: round trip, run.yaml content, load's rejections, atomic writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from paca_prof import trace


def _schema_dtype(dtype: str):
    return pd.Series([], dtype=dtype).dtype


def _assert_schema(table: pd.DataFrame, name: str) -> None:
    columns = trace.ALL_TABLES[name]
    assert list(table.columns[: len(columns)]) == list(columns), name
    for column, dtype in columns.items():
        assert table[column].dtype == _schema_dtype(dtype), (name, column, table[column].dtype)


def _tables(t: trace.Trace) -> dict[str, pd.DataFrame]:
    return {name: getattr(t, name) for name in trace.TABLES}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# The least run.yaml that load() accepts (validate_run's required keys).
MINIMAL_RUN = {"source": "simulated", "model": {"name": "m"}, "seq": 7, "batch": 1,
               "device": {"type": "meta", "name": "meta device"}}


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message.strip(), "empty message"
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    return message


# --- round trip ---------------------------------------------------------------------------------

def test_measured_tables_follow_schema(measured_trace):
    for name in trace.TABLES:
        _assert_schema(getattr(measured_trace, name), name)
    assert measured_trace.source == "measured"
    assert measured_trace.methods == ["frozen", "lora", "dora", "paca", "full"]
    assert set(measured_trace.chrome_traces) == set(measured_trace.methods)


def test_write_load_round_trip_of_measured_trace(measured_trace, tmp_path):
    out = trace.write(tmp_path / "copy", measured_trace.run, _tables(measured_trace))
    loaded = trace.load(out)
    assert loaded.run == measured_trace.run
    for name in trace.TABLES:
        _assert_schema(getattr(loaded, name), name)
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(measured_trace, name),
                                      check_exact=True)


def test_round_trip_of_missing_columns_na_and_extra_columns(tmp_path):
    summary = pd.DataFrame({
        "method": ["lora", "paca"], "status": ["ok", "oom"], "error": [None, "out of memory"],
        "step_ms": [1.5, float("nan")], "peak_bytes": [123, None], "my_extra": [1, 2],
    })
    ops = pd.DataFrame({"method": ["lora"], "name": ["aten::mm"], "adapter_branch": [True],
                        "dur_us": [3.25]})
    written = trace.write(tmp_path / "t", MINIMAL_RUN,
                          {"summary": summary, "ops": ops})
    loaded = trace.load(written)
    for name in trace.TABLES:
        _assert_schema(getattr(loaded, name), name)
    s = loaded.summary
    assert list(s["method"]) == ["lora", "paca"]
    assert list(s["status"]) == ["ok", "oom"]
    assert s["error"].isna().tolist() == [True, False]
    assert s.loc[0, "peak_bytes"] == 123 and s["peak_bytes"].isna().tolist() == [False, True]
    assert s["step_ms"].isna().tolist() == [False, True]
    assert s["trainable_params"].isna().all()  # a column the input did not have
    assert list(s["my_extra"]) == [1, 2]  # columns may be added
    assert loaded.ops["adapter_branch"].tolist() == [True]
    assert loaded.layers.empty and loaded.memory.empty
    assert loaded.run["schema_version"] == trace.SCHEMA_VERSION
    assert loaded.run["source"] == "simulated" and loaded.run["seq"] == 7


def test_a_rank_is_checked_and_selects_every_tables_rows(tmp_path):
    """for_rank keeps one rank's rows in every table, the optional ones included (steps:
    the spread of that rank's timed steps); check_rank takes whole numbers among the trace's
    ranks only (a value from outside: a bool, float, string or list is refused), and
    TraceAnalysis.for_rank makes each rank's analysis once over the same loaded trace."""
    import numpy as np

    from paca_prof.analyze import TraceAnalysis

    summary = pd.DataFrame({"method": ["lora", "lora"], "status": ["ok", "ok"],
                            "peak_bytes": [100, 200], "rank": [0, 1]})
    steps = pd.DataFrame({"method": ["lora"] * 4, "round": [0, 1, 0, 1], "step": [0, 1, 0, 1],
                          "step_ms": [1.0, 1.0, 2.0, 2.0], "rank": [0, 0, 1, 1]})
    memory = pd.DataFrame({"method": ["lora"] * 2, "t": [0.0, 0.0], "category": ["weights"] * 2,
                           "allocated_bytes": [100, 200], "rank": [0, 1]})
    loaded = trace.load(trace.write(tmp_path / "t", MINIMAL_RUN,
                                    {"summary": summary, "steps": steps, "memory": memory}))
    assert loaded.ranks == [0, 1]
    one = loaded.for_rank(1)
    assert one.summary["peak_bytes"].tolist() == [200]
    assert one.steps["step_ms"].tolist() == [2.0, 2.0] and set(one.steps["rank"]) == {1}
    assert one.memory["allocated_bytes"].tolist() == [200]
    assert loaded.for_rank(0).steps["step_ms"].tolist() == [1.0, 1.0]
    assert loaded.check_rank(np.int64(1)) == 1
    for bad, words in ((True, "whole number"), (1.0, "whole number"), ("1", "whole number"),
                       ([1], "whole number"), (None, "whole number"),
                       (2, "rank 2 is not in this trace (ranks 0, 1)"),
                       (10**400, "is not in this trace")):
        with pytest.raises(ValueError) as raised:
            loaded.for_rank(bad)
        assert words in str(raised.value) and len(str(raised.value)) < 120, raised.value
    analysis = TraceAnalysis(loaded)
    assert analysis.rank == 0 and analysis.for_rank(0) is analysis
    rank_1 = analysis.for_rank(1)
    assert rank_1 is analysis.for_rank(1) and rank_1.for_rank(0) is analysis
    assert rank_1.summary()["peak_mib"].tolist() == [200 / 2**20]
    assert rank_1.all_ranks is loaded
    with pytest.raises(ValueError, match="whole number"):
        analysis.for_rank(True)


def test_the_steps_table_round_trips_and_old_traces_without_it_load(measured_trace, tmp_path):
    """steps.parquet is optional: a measured trace has it (schema dtypes), and a trace written
    before it existed (no steps table, no spread or throughput columns in the summary) loads
    with steps None and those columns NA, and the analyzer still shows its step times."""
    from paca_prof.analyze import TraceAnalysis

    _assert_schema(measured_trace.steps, "steps")
    assert len(measured_trace.steps) > 0
    tables = {**_tables(measured_trace), "steps": measured_trace.steps}
    loaded = trace.load(trace.write(tmp_path / "copy", measured_trace.run, tables))
    pd.testing.assert_frame_equal(loaded.steps, measured_trace.steps, check_exact=True)
    old_summary = measured_trace.summary.drop(columns=[
        "step_ms_p25", "step_ms_p75", "steps_timed", "warmup_steps", "step_ratio",
        "step_ratio_lo", "step_ratio_hi", "spread_warning", "tokens_per_s", "step_tflop",
        "achieved_tflops", "mfu"])
    old_run = {k: v for k, v in measured_trace.run.items() if k != "timing"}
    old = trace.load(trace.write(tmp_path / "old", old_run,
                                 {**_tables(measured_trace), "summary": old_summary}))
    assert old.steps is None
    assert old.summary["step_ms_p25"].isna().all() and old.summary["mfu"].isna().all()
    spread = TraceAnalysis(old).timing_spread()
    assert spread["step_ms"].notna().all() and spread["step_ratio_lo"].isna().all()
    assert (spread["spread_warning"] == "").all() and not spread["contains_1"].any()


def test_run_yaml_records_the_run(measured_trace, measured_trace_path):
    from conftest import MEASURED_RUN

    run = yaml.safe_load((measured_trace_path / "run.yaml").read_text())
    assert run == measured_trace.run
    assert run["schema_version"] == 1
    assert run["source"] == "measured"
    assert isinstance(run["command"], str) and run["command"]
    assert run["created"]
    assert run["model"]["name"] == "tiny"
    config = run["model"]["config"]
    assert config["model_type"] == "llama"
    for key, value in dict(vocab_size=1024, hidden_size=128, intermediate_size=352,
                           num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2).items():
        assert config[key] == value, key
    assert run["seq"] == MEASURED_RUN["seq"] and run["batch"] == MEASURED_RUN["batch"]
    assert run["dtype"] == "fp32"
    assert run["seed"] == 0
    assert run["device"]["name"] and run["device"]["memory_bytes"] > 0
    assert run["device"]["type"] == "cpu"
    assert list(run["methods"]) == ["frozen", "lora", "dora", "paca", "full"]
    for method in ("lora", "dora", "paca"):
        settings = run["methods"][method]
        assert settings["r"] == 8 and settings["alpha"] == 16.0, method
        assert "adapter_dtype" in settings and "implementation" in settings, method
    assert run["methods"]["paca"]["seed"] == 0
    assert run["methods"]["lora"]["dropout"] == 0.0
    assert run["methods"]["frozen"] == {"method": "frozen"}
    recipe = run["recipe"]
    assert recipe["targets"] is None  # the default, resolved for the architecture:
    assert recipe["resolved_targets"]["names"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert recipe["resolved_targets"]["linears"] == 7 * run["model"]["config"][
        "num_hidden_layers"]
    assert recipe["resolved_targets"]["rule"].startswith("default")
    assert recipe["attention"] == "sdpa" and recipe["grad_ckpt"] is False
    assert recipe["optimizer"] == "adamw" and recipe["loss"] == "hf"
    assert {"timing", "memory", "ops"} <= set(run["assumptions"])
    assert {"python", "torch", "transformers", "peft", "paca_prof"} <= set(run["versions"])
    assert all(run["versions"].values())


# --- load rejects broken folders ----------------------------------------------------------------

@pytest.fixture
def trace_copy(measured_trace_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(measured_trace_path, copy)
    trace.load(copy)  # the copy itself is fine
    return copy


def test_load_rejects_missing_folder(tmp_path):
    with pytest.raises(trace.TraceError) as info:
        trace.load(tmp_path / "nope")
    assert "nope" in _one_line(info.value)


def test_load_rejects_truncated_parquet(trace_copy):
    table = trace_copy / "layers.parquet"
    data = table.read_bytes()
    table.write_bytes(data[: len(data) // 2])
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "layers.parquet" in _one_line(info.value)


def test_load_rejects_missing_parquet(trace_copy):
    (trace_copy / "ops.parquet").unlink()
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "ops.parquet" in _one_line(info.value)


def test_load_rejects_other_schema_version(trace_copy):
    run_file = trace_copy / "run.yaml"
    run = yaml.safe_load(run_file.read_text())
    run["schema_version"] = 2
    run_file.write_text(yaml.safe_dump(run))
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "schema_version" in _one_line(info.value)


@pytest.mark.parametrize("content", [
    "{{{ not: [yaml",           # not YAML at all
    "just a sentence\n",         # YAML, but not a mapping
    "- a\n- list\n",             # a list
    "",                          # empty file
    "\x00\x01\x02binary",        # binary garbage
])
def test_load_rejects_garbage_run_yaml(trace_copy, content):
    (trace_copy / "run.yaml").write_text(content)
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "run.yaml" in _one_line(info.value)


def test_load_rejects_run_yaml_nested_deeper_than_the_parser_goes(trace_copy):
    (trace_copy / "run.yaml").write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "unreadable run.yaml (RecursionError)" in _one_line(info.value)


def test_load_rejects_a_summary_row_without_a_method(trace_copy):
    table = trace_copy / "summary.parquet"
    summary = pd.read_parquet(table)
    summary.loc[summary.index[0], "method"] = None
    summary.to_parquet(table)
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    assert "summary.parquet has a row without a method" in _one_line(info.value)


def test_load_rejects_missing_run_yaml(trace_copy):
    (trace_copy / "run.yaml").unlink()
    with pytest.raises(trace.TraceError) as info:
        trace.load(trace_copy)
    _one_line(info.value)


# --- atomic writes ------------------------------------------------------------------------------

def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or p.name.startswith("."))


def test_write_to_existing_path_raises_and_leaves_it_untouched(measured_trace, trace_copy):
    before = _snapshot(trace_copy)
    with pytest.raises(trace.TraceError) as info:
        trace.write(trace_copy, {"source": "measured"}, _tables(measured_trace))
    _one_line(info.value)
    assert _snapshot(trace_copy) == before
    assert _leftovers(trace_copy.parent) == []


def test_write_to_existing_empty_folder_raises(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(trace.TraceError):
        trace.write(tmp_path / "out", {"source": "measured"}, {})
    assert list((tmp_path / "out").iterdir()) == []


def test_failure_while_writing_leaves_nothing(measured_trace, tmp_path, monkeypatch):
    calls = []
    real = pd.DataFrame.to_parquet

    def failing(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the first table is written, the second fails
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    parent = tmp_path / "traces"
    parent.mkdir()
    (parent / "other").mkdir()  # an unrelated neighbour is not touched
    with pytest.raises(OSError, match="simulated"):
        trace.write(parent / "run", measured_trace.run, _tables(measured_trace))
    assert len(calls) == 2
    assert not (parent / "run").exists()
    assert sorted(p.name for p in parent.iterdir()) == ["other"]


def test_interrupt_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace.write(tmp_path / "run", {"source": "measured"}, {})
    assert list(tmp_path.iterdir()) == []


def test_failure_moving_chrome_trace_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        trace.write(tmp_path / "run", {"source": "measured"}, {},
                    chrome_traces={"lora": tmp_path / "missing.json"})
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_unknown_source_and_writes_nothing(tmp_path):
    with pytest.raises(trace.TraceError) as info:
        trace.write(tmp_path / "run", {"source": "guessed"}, {})
    _one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_moves_chrome_traces_into_folder(tmp_path):
    source = tmp_path / "paca.json"
    source.write_text('{"traceEvents": []}')
    out = trace.write(tmp_path / "run", {**MINIMAL_RUN, "source": "measured"},
                      {"summary": pd.DataFrame({"method": ["paca"], "status": ["ok"]})},
                      chrome_traces={"paca": source})
    loaded = trace.load(out)
    assert loaded.chrome_traces == {"paca": out / "trace-paca.json"}
    assert (out / "trace-paca.json").read_text() == '{"traceEvents": []}'
    assert not source.exists()


# --- one writer per output, and signals --------------------------------------------------------

def test_a_second_writer_to_the_same_output_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    with trace.Reservation(out) as first:
        with pytest.raises(trace.TraceError, match="another paca-prof is writing") as info:
            trace.Reservation(out).__enter__()
        _one_line(info.value)
        first.commit(MINIMAL_RUN, {"summary": pd.DataFrame({"method": ["paca"],
                                                            "status": ["ok"]})})
    assert trace.load(out).methods == ["paca"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, no staging left


def test_an_output_name_too_long_is_refused_before_anything_is_made(tmp_path):
    with pytest.raises(trace.TraceError, match="bytes"):
        trace.Reservation(tmp_path / ("x" * 256)).__enter__()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_run_cleans_up_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import checkout_env

    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "paca_prof.cli", "run", "--model", "tiny", "--seq", "256",
         "--device", "cpu", "--steps", "400", "--methods", "lora", "--out", str(out)],
        env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(p.name.startswith(trace.STAGING_PREFIX) for p in tmp_path.iterdir()):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-2000:]
        time.sleep(0.2)
    time.sleep(1.0)  # inside the measured steps
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("paca-prof: stopped by SIGTERM; nothing was "
                                            "written")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no trace, no staging folder, no lock
