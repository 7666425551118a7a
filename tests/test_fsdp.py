"""FSDP2: measured under torchrun (2 CPU ranks on gloo, the tiny model), simulated per rank, and
the two against each other; the per-rank activation bytes against a single-process run."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import checkout_env, run_spec
from paca_prof import engines, trace
from paca_prof.distributed import Distributed, shard_rows

METHODS = ("lora", "paca", "full")
SHAPE = dict(model="tiny", seq=64, batch=1, dtype="fp32", attention="eager")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One torchrun of 2 gloo ranks, one measured step per method (no warm-up: FSDP2's lazy
    init runs in the timing step, the profiled step is the second)."""
    out = tmp_path_factory.mktemp("fsdp") / "measured"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "paca_prof", "run", "--model", "tiny", "--seq", "64", "--device", "cpu",
               "--fsdp", "--methods", ",".join(METHODS), "--steps", "1", "--warmup", "0",
               "--attention", "eager", "--out", str(out)]
    done = subprocess.run(command, env=checkout_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return trace.load(out)


@pytest.fixture(scope="module")
def simulated_gloo(tmp_path_factory):
    """The simulated rank of the measured configuration (gloo's scratch buffers modelled)."""
    return _simulate(tmp_path_factory.mktemp("fsdp-sim"), "sim", world_size=2, fsdp=True,
                     backend="gloo")


def _simulate(tmp_path, name, **distributed):
    spec = run_spec(**SHAPE, device="meta", methods=METHODS,
                    distributed=Distributed(**distributed) if distributed else Distributed())
    return trace.load(engines.run(spec, tmp_path / name, "test"))


def test_rank_0_writes_every_ranks_rows(measured):
    assert measured.ranks == [0, 1]
    for name in ("summary", "layers", "ops", "memory"):
        table = getattr(measured, name)
        assert set(table["rank"]) == {0, 1}, name
    summary = measured.summary
    assert sorted(summary.groupby("method").size()) == [2, 2, 2]
    assert (summary["status"] == "ok").all(), summary[["method", "rank", "error"]]
    assert measured.run["distributed"]["world_size"] == 2
    assert measured.run["distributed"]["fsdp"] is True
    assert measured.methods == list(METHODS)


def test_measured_sharded_state_is_half_the_single_process_one(measured, simulated_gloo):
    """Before the step every rank holds its padded dim-0 shard of every parameter (frozen
    bases too) and its rows' optimizer states: the simulated sharded static bytes."""
    simulated = simulated_gloo
    for method in METHODS:
        for rank in (0, 1):
            got = measured.for_rank(rank).summary.set_index("method").loc[method]
            want = simulated.summary.set_index("method").loc[method]
            for category in ("weights", "trainable", "optimizer"):
                column = trace.peak_column(category)
                assert got[column] == want[column], (method, rank, category)


def test_simulated_per_rank_peak_equals_measured_within_2_percent(measured, simulated_gloo):
    """The simulated rank's peak against every measured rank's. The measurement sees every
    free at the time the run made it, also those of gloo's worker thread (engines/fsdp.py's
    collectives, memory.with_collective_frees), so both ranks' peaks are the same."""
    sim = simulated_gloo.summary.set_index("method")
    for method in METHODS:
        peaks = measured.summary[measured.summary["method"] == method]["peak_bytes"]
        assert peaks.nunique() == 1, (method, list(peaks))
        predicted = int(sim.loc[method, "peak_bytes"])
        assert abs(predicted - int(peaks.iloc[0])) <= 0.02 * int(peaks.iloc[0]), \
            (method, predicted, list(peaks))


def test_per_rank_activation_bytes_equal_a_single_process_run(measured, simulated_gloo,
                                                              tmp_path):
    """Each rank saves for backward what one process saves at the same batch: measured under
    FSDP2 (its gathered parameters are parameters, not activations) and simulated."""
    single = _simulate(tmp_path, "single")
    sharded = simulated_gloo
    for method in METHODS:
        want = int(single.summary.set_index("method").loc[method, "activation_bytes"])
        assert int(sharded.summary.set_index("method").loc[method, "activation_bytes"]) == want
        for rank in (0, 1):
            row = measured.for_rank(rank).summary.set_index("method").loc[method]
            assert int(row["activation_bytes"]) == want, (method, rank)


def test_more_ranks_shard_more_and_activations_stay(tmp_path):
    two = _simulate(tmp_path, "two", world_size=2, fsdp=True).summary.set_index("method")
    four = _simulate(tmp_path, "four", world_size=4, fsdp=True).summary.set_index("method")
    for method in METHODS:
        assert four.loc[method, "activation_bytes"] == two.loc[method, "activation_bytes"]
        for category in ("weights", "trainable", "optimizer"):
            column = trace.peak_column(category)
            assert four.loc[method, column] <= two.loc[method, column]
    assert four.loc["full", "peak_trainable_bytes"] < two.loc["full", "peak_trainable_bytes"]


def test_keeping_parameters_gathered_costs_memory(tmp_path):
    kept = _simulate(tmp_path, "kept", world_size=2, fsdp=True, reshard_after_forward=False)
    freed = _simulate(tmp_path, "freed", world_size=2, fsdp=True)
    for method in METHODS:
        assert kept.summary.set_index("method").loc[method, "peak_bytes"] > \
            freed.summary.set_index("method").loc[method, "peak_bytes"]


def test_old_traces_load_as_rank_0(tmp_path):
    simulated = _simulate(tmp_path, "plain")
    assert simulated.ranks == [0]
    assert "distributed" not in simulated.run
    for name in ("summary", "layers", "ops", "memory"):
        assert (getattr(simulated, name)["rank"] == 0).all()


@pytest.mark.parametrize("rows, world, expected", [
    (10, 4, [(3, 3), (3, 3), (3, 3), (1, 3)]),
    (2, 4, [(1, 1), (1, 1), (0, 1), (0, 1)]),
    (8, 2, [(4, 4), (4, 4)]),
])
def test_shards_are_torch_chunks_padded(rows, world, expected):
    assert [shard_rows(rows, world, r) for r in range(world)] == expected


def test_plan_per_rank_fits_longer_sequences_when_sharded():
    """The planner's bytes are one rank's: sharding full fine-tuning's parameters, gradients
    and optimizer states over 4 ranks leaves room for longer sequences on each."""
    from paca_prof import plan as planner
    from paca_prof.budget import make_budget

    budget = make_budget(memory="40MiB", headroom="0")
    results = {}
    for world in (1, 4):
        distributed = Distributed(world, fsdp=True) if world > 1 else None
        spec = planner.make_spec("tiny", ("full",), distributed=distributed)
        results[world] = planner.plan(spec, budget, granularity=64, confirm="never")
    one, four = (results[w].methods["full"] for w in (1, 4))
    assert four.max_size > one.max_size > 0
    assert results[4].to_dict()["distributed"]["world_size"] == 4
    assert "per_rank" in results[4].assumptions()


def test_simulated_fsdp_projects_communication_in_the_op_timeline(tmp_path):
    """On a GPU the collectives are projected (rows of device `interconnect` in the ops table,
    one all-gather per group and pass, one reduce-scatter per trained group) and the step
    includes what the compute cannot hide."""
    from paca_prof.engines.comm import COMM_DEVICE
    from paca_prof.gpus import GPUS

    spec = run_spec(model="tiny", seq=64, batch=1, device="meta", methods=("lora",),
                    distributed=Distributed(2, fsdp=True, interconnect="pcie"))
    loaded = trace.load(engines.run(spec, tmp_path / "comm", "test", gpu=GPUS["h100-80gb"]))
    ops = loaded.ops
    comm = ops[ops["device"] == COMM_DEVICE]
    names = comm.groupby(["name", "phase"]).size().to_dict()
    # root + 2 layers gathered in forward; 2 layers again in backward; 2 layers + root
    # reduce-scattered (the root has no trained parameter under lora: none for it)
    assert names == {("nccl:all_gather", "forward"): 3, ("nccl:all_gather", "backward"): 2,
                     ("nccl:reduce_scatter", "backward"): 2}, names
    assert (comm["dur_us"] > 0).all() and (comm["bytes"] > 0).all()
    summary = loaded.summary.set_index("method").loc["lora"]
    assert summary["n_kernels"] == len(ops) - len(comm)
    kernels = ops[ops["device"] != COMM_DEVICE]
    first_forward = kernels[kernels["phase"] == "forward"]["start_us"].min()
    root_gather = comm.iloc[0]
    assert first_forward >= root_gather["start_us"] + root_gather["dur_us"]


PACA_UNDER_FSDP = '''
import sys, torch, torch.distributed as dist
from paca_prof.spec import RunSpec
from paca_prof.distributed import Distributed
from paca_prof.engines import step
from paca.layer import PacaLinear
fsdp = sys.argv[1] == "fsdp"
if fsdp:
    dist.init_process_group("gloo")
spec = RunSpec(model="tiny", seq=16, device="cpu", dtype="fp32", methods=("paca",),
               distributed=Distributed(dist.get_world_size() if fsdp else 1, fsdp))
run = step.prepare(spec, "paca", "cpu")
ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
losses = [float(run.step(ids)) for _ in range(3)]
worst = 0.0
for layer in (m for m in run.model.modules() if isinstance(m, PacaLinear)):
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    w, p = whole(layer.weight).detach(), whole(layer.paca_weight).detach()
    worst = max(worst, (w[:, layer.indices] - layer.scaling * p).abs().max().item())
if not fsdp or dist.get_rank() == 0:
    print("RESULT", repr(losses), worst)
'''


def test_paca_trains_under_fully_shard_as_in_one_process(tmp_path):
    """The same batch on both ranks: FSDP2's averaged gradients are one process's, so PaCA's
    losses are the same step by step, and every rank writes its rows of the trained columns
    into its shard of W (W[:, indices] == scaling * paca_weight, gathered)."""
    script = tmp_path / "paca_fsdp.py"
    script.write_text(PACA_UNDER_FSDP)

    def result(command):
        done = subprocess.run(command, env=checkout_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
        losses, worst = line.removeprefix("RESULT ").rsplit(" ", 1)
        return eval(losses), float(worst)  # our own script's repr of a list of floats

    single, single_err = result([sys.executable, str(script), "single"])
    sharded, sharded_err = result([sys.executable, "-m", "torch.distributed.run",
                                   "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                   "--master-port", str(_free_port()), str(script), "fsdp"])
    assert single_err == 0.0 and sharded_err == 0.0
    assert sharded == pytest.approx(single, rel=1e-6)
    assert single[-1] < single[0]
