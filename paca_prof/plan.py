"""Capacity planner: the longest sequence (or the largest batch) each method can train on a GPU.

    budget = GPU memory (or a given amount) - the GPU's CUDA context - headroom
    answer = the largest size, on a grid, whose reserved memory in one training step (forward,
             loss, backward, AdamW step), as PyTorch's caching allocator would hold it, is at
             most the budget

Reserved memory. A simulated step gives the live tensor bytes at its peak (engines/simulate.py)
and, replayed through the caching-allocator model (reserved.py), what the allocator reserves
from the device: rounded blocks, whole segments, fragmentation. That is what runs out, and what
published measurements give (max_memory_reserved). The CUDA context is the GPU table's
cuda_context_bytes (0 for a bare --memory). The headroom keeps back only what stays unmodelled,
DEFAULT_HEADROOM = "512MiB+1%" (budget.py says what each part stands for); any sum of byte
sizes and percentages of the device memory is accepted ("2GiB", "10%", "0"); every answer
states it. A full-depth simulation is replayed exactly, within the budget as `run` replays it
(the allocator frees its cache and retries before it fails, as PyTorch's does), so `run` and
`plan` give one verdict for one size; an extrapolated point's reserved memory
is estimated as its peak times reserved/peak of the last full-depth simulation (before there is
one, of the deepest shallow simulation, which overestimates: 1.09-1.21 at 3 layers against
1.03-1.07 at 32 on llama3-8b), so answers near the budget are confirmed at full depth.

How a size is checked. Decoder layers are identical, so the planner simulates models of 2 and 3
layers (the config copied with num_hidden_layers changed) and extrapolates to the real depth N.
A step's memory timeline is cut into segments (forward through the layers; lm_head and loss
forward; their backward; backward through the layers; optimizer step). Within a segment the
peak sits at a fixed place of the layer pattern (after the last layer's forward, at the first or
the last layer's backward, ...), so its bytes, per category, are affine in N:
peak_N = peak_2 + (N - 2) * (peak_3 - peak_2). The step's peak is the largest segment peak at N.
Extrapolating the step's peak as a whole would be wrong where the segment holding it changes
with depth (the logits at 2-3 layers, the gradients and optimizer temporaries at 32: full
fine-tuning with gradient checkpointing, DoRA at 16k tokens). Against full-depth simulation
this was exact to the byte in every case checked (llama3-8b, llama2-7b, mistral-7b, qwen2.5-7b;
every method; flash, efficient and eager attention; batch > 1; gradient checkpointing; see
tests/test_plan.py and bench/bench_plan.py). A peak inside a middle layer (one that neither 2-
nor 3-layer models show at its place) would break it; confirmation at full depth catches that.
Models of 3 layers or fewer, or with unequal layer types, are simulated at full depth. Under
FSDP2 the depths are 3 and 4 and the timeline is also cut where the second layer's forward and
the first layer's backward begin (the root's gathered parameters make the first layer unlike
the others; segment_peaks), exact again against full-depth simulation (tests/test_plan.py).

Search. Peak memory grows with the sequence: affine with fused attention (flash, efficient),
quadratic with eager attention, affine in the batch always, per segment. Two probes (1024 and
4096 tokens, or batch 1 and 4) are fitted per segment to jump to the predicted crossing; the
answer is then bracketed by real probes, one grid step apart: max fits, max + step does not.
Reserved memory, which decides, need not grow with the size (full fine-tuning's cached blocks
fit each length differently): a probe that fits above one that does not is never the answer.
The grid is `granularity` tokens (default 64) for sequences and 1 for batches. When the time
budget allows, both ends are then simulated at full depth ("confirmed"); were they to disagree,
the search continues at full depth. A full-depth simulation of a model with alike layers costs
about a 6-layer one: the simulator steps 5 layers and replicates the middle one to the full
depth, exactly (engines/replicate.py).

Curve. Peak bytes by category at ~10 sizes up to 1.25x the answer, per method: the probed sizes
are simulations, the others are fitted per segment through the nearest probes (exact where the
segment is affine/quadratic in size, as with flash/eager attention); `probed` tells which.

Limits: what neither the simulation nor the allocator model covers (kernel workspaces, other
streams, first-step-only allocations) is what the headroom is for; peak memory is assumed to grow
with size (it does for every method here), but reserved memory need not: fragmentation depends
on how the step's blocks fall into segments (full fine-tuning of llama3-8b with flash
attention reserves 78.4 GiB at 1344 tokens, 88.3 at 3072 and 79.9 at 4096 when nothing bounds
it; within the 78.20 GiB budget of an A100 80GB, where the allocator frees its cache before it
fails, it fits up to 4224 tokens), so an answer is the largest size below the first one found
not to fit, and a longer one can fit where reserved dips; sequences are searched up to
SEQ_LIMIT tokens and batches up to BATCH_LIMIT (an answer at the limit says so); the model's
max_position_embeddings is not enforced.

This module imports torch only inside the functions that simulate; the budget is budget.py's and
the result classes are pandas-only. The curve has the columns of the analyzer's capacity sweep
(paca_prof.analyze.capacity), whose max_seq_from_curve re-reads it for another budget without
simulating.

Reading order: the results (Point, MethodPlan, PlanResult), then plan() and the steps it takes:
make_spec, one job per method (parallel.py: side by side, one per core) with its _MethodModel
(simulating and extrapolating a size), _search (a Bracket closed by fitted jumps) and
_confirm, then the curve, and write_trace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from paca_prof.budget import DEFAULT_HEADROOM, HEADROOM_MEANING, Budget
from paca_prof.memory import MEMORY_CATEGORIES
from paca_prof.recipe import Recipe
from paca_prof.reserved import ALLOCATOR_WORDS

# pandas is imported where a plan is made or written, not here: `paca-prof --help` reads this
# module's defaults and stays fast.
if TYPE_CHECKING:
    import pandas as pd

PLAN_METHODS = ("lora", "dora", "paca", "full")  # frozen trains nothing: ask for it explicitly
DEFAULT_GRANULARITY = 64  # tokens
SEQ_LIMIT = 1 << 20  # 1,048,576 tokens
BATCH_LIMIT = 1 << 16
SEQ_START = (1024, 4096)
BATCH_START = (1, 4)
DEPTHS = (2, 3)  # simulated depths that are extrapolated to the model's
FSDP_DEPTHS = (3, 4)  # the same under FSDP2 (see _depths)
CURVE_POINTS = 10
CURVE_SPAN = 1.25  # the curve runs up to 1.25x the answer
# Full-depth confirmation runs only while the plan (the whole command, imports included, for
# `paca-prof plan`) stays within this many seconds.
DEFAULT_TIME_BUDGET_S = 27.0
CONFIRM_SAFETY = 1.5  # a confirmation starts only if 1.5x its estimated time fits the budget
# The search jumps to the crossing fitted through its probes at most this often; a fit that
# twice fails to close the bracket is not describing the curve (a segment changed shape), so
# the search bisects from there.
MAX_FITTED_JUMPS = 2
# Full-depth confirmations before the search goes on at full depth: the first corrects the
# reserved estimate of the extrapolated points, the second confirms the corrected answer.
RESERVED_ROUNDS = 2

Progress = Callable[[str, str], None]  # (method, what is happening)


# --- Results --------------------------------------------------------------------------------

@dataclass
class Point:
    """One simulated (or extrapolated) step at one size: its peak (tensor bytes alive), with
    the bytes of each memory category at the peak, each segment's peak (for fitting), and its
    reserved memory: replayed through the allocator model for a simulated point, estimated
    for an extrapolated one (see _MethodModel.probe). A size fits when reserved_bytes does."""

    seq: int
    batch: int
    peak_bytes: int
    breakdown: dict[str, int]
    segments: dict[str, dict[str, int]]
    depth: int  # the depth simulated; extrapolated points give the model's depth
    extrapolated: bool
    reserved_bytes: int = 0

    @property
    def reserved_ratio(self) -> float:
        return self.reserved_bytes / self.peak_bytes if self.peak_bytes else 1.0


# What a MethodPlan's `confirmation` says.
CONFIRMED = "confirmed at full depth"
FULL_DEPTH = "simulated at full depth throughout"
CORRECTED = "extrapolation disagreed; searched again at full depth"
UNCONFIRMED_TIME = "extrapolated, not confirmed at full depth (time budget)"
UNCONFIRMED_OFF = "extrapolated, not confirmed at full depth (confirmation off)"


@dataclass
class MethodPlan:
    """One method's answer. `max_size` is the largest seq (or batch) that fits, 0 if even the
    smallest does not; `best` is the point at max_size (None when 0) and `next` the first size
    that does not fit (None at the search limit); `smallest` is the smallest size probed (the
    first grid size when nothing fits). `confirmation` says whether best and next were
    simulated at full depth; `probes` lists every size simulated, smallest first."""

    method: str
    vary: str  # "seq" or "batch"
    max_size: int
    best: Point | None
    next: Point | None
    smallest: Point
    at_limit: bool
    confirmation: str
    probes: list[Point] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.max_size > 0

    @property
    def confirmed(self) -> bool:
        return self.confirmation in (CONFIRMED, FULL_DEPTH, CORRECTED)


@dataclass
class PlanResult:
    """A plan for several methods under one budget. `curve` has one row per (method, size,
    category): method, seq, batch, category, bytes (alive at the step's peak), probed (True for
    a simulated size, False for a fitted one); a point's peak is the sum over categories."""

    model: str
    n_layers: int
    budget: Budget
    vary: str
    seq: int | None  # fixed seq when the batch is searched
    batch: int  # fixed batch when the seq is searched
    dtype: str
    recipe: Recipe
    granularity: int
    depths: tuple[int, ...]
    methods: dict[str, MethodPlan]
    curve: pd.DataFrame
    method_settings: dict[str, dict]
    elapsed_s: float
    distributed: dict | None = None  # Distributed.describe() of an FSDP2 plan

    def assumptions(self) -> dict:
        """What every number rests on, in words and values (for --json and the printout)."""
        if len(self.depths) == 1:
            depth = f"the full {self.n_layers}-layer model simulated at every probe"
        else:
            depth = (f"models of {self.depths[0]} and {self.depths[1]} decoder layers simulated "
                     f"and each timeline segment's peak extrapolated linearly to "
                     f"{self.n_layers} layers; answers confirmed at full depth when the time "
                     f"budget allows (see each method's confirmation)")
        return {
            "attention": self.recipe.attention,
            "dtype": self.dtype,
            "grad_ckpt": self.recipe.grad_ckpt,
            "batch": self.batch if self.vary == "seq" else "searched",
            "seq": self.seq if self.vary == "batch" else "searched",
            "granularity": self.granularity,
            "granularity_unit": "tokens" if self.vary == "seq" else "sequences",
            "memory": "simulated on the meta device (paca_prof.engines.simulate): exact tensor "
                      "bytes alive at the peak of one training step (forward, loss, backward, "
                      "optimizer step, zero_grad); a size fits when its reserved memory does",
            "reserved": f"{ALLOCATOR_WORDS[self.recipe.allocator]}, modelled "
                        "(paca_prof/reserved.py): full-depth steps replayed; extrapolated "
                        "points estimated as their peak times reserved/peak of the last "
                        "full-depth step (or, before one, of the deepest model simulated)",
            "budget": self.budget.describe(),
            "depth": depth,
            "headroom": f"{self.budget.headroom}"
                        + (f" ({HEADROOM_MEANING})" if self.budget.headroom == DEFAULT_HEADROOM
                           else ""),
            "optimizer": self.recipe.describe("meta")["optimizer_detail"]
                         + "; state in the trainable parameters' dtype",
            "curve": f"~{CURVE_POINTS} sizes up to {CURVE_SPAN}x the answer; probed sizes "
                     "simulated, others fitted per segment through the nearest probes",
            "methods": self.method_settings,
            **({"per_rank": f"every byte is one rank's under FSDP2 over "
                            f"{self.distributed['world_size']} ranks (rank 0: full padded "
                            "shards; sharded parameters, gradients, optimizer states; "
                            "all-gather buffers of the current and prefetched layer; "
                            "reduce-scatter buffers; engines/fsdp_sim.py); batch per rank; "
                            "FSDP2 pads every rank's shards to the same size, so each answer "
                            "holds for every rank"}
               if self.distributed else {}),
        }

    def curve_table(self, method: str) -> pd.DataFrame:
        """The curve of one method as the plan printout shows it, one row per size, smallest
        first: the size (column named by `vary`), reserved_bytes, peak_bytes (the sum of the
        categories), the bytes of each memory category, probed (simulated, else fitted),
        over_budget (reserved above the budget) and is_max (the answer's size)."""
        curve = self.curve[self.curve["method"] == method]
        table = curve.pivot_table(index=[self.vary, "probed"], columns="category",
                                  values="bytes", aggfunc="sum").reset_index()
        categories = list(MEMORY_CATEGORIES)
        table[categories] = table[categories].astype("int64")
        reserved = curve.groupby(self.vary)["reserved_bytes"].first()
        table.insert(1, "reserved_bytes", [int(reserved.loc[s]) for s in table[self.vary]])
        table.insert(2, "peak_bytes", table[categories].sum(axis=1))
        table[self.vary] = table[self.vary].astype("int64")
        table["over_budget"] = table["reserved_bytes"] > self.budget.budget_bytes
        table["is_max"] = table[self.vary] == self.methods[method].max_size
        table.columns.name = None
        return table.sort_values(self.vary, kind="stable").reset_index(drop=True)[
            [self.vary, "reserved_bytes", "peak_bytes", *categories, "probed", "over_budget",
             "is_max"]]

    def to_dict(self) -> dict:
        """The JSON object of `paca-prof plan --json`."""
        key = f"max_{self.vary}"
        methods = {}
        for name, mp in self.methods.items():
            curve = self.curve[self.curve["method"] == name]
            points = []
            for (seq, batch, probed), group in curve.groupby(["seq", "batch", "probed"],
                                                            sort=True):
                by_cat = dict(zip(group["category"], (int(b) for b in group["bytes"])))
                points.append({"seq": int(seq), "batch": int(batch),
                               "peak_bytes": sum(by_cat.values()),
                               "reserved_bytes": int(group["reserved_bytes"].iloc[0]),
                               "probed": bool(probed), "breakdown": by_cat})
            methods[name] = {
                key: mp.max_size,
                "fits": mp.fits,
                "peak_bytes": mp.best.peak_bytes if mp.best else None,
                "reserved_bytes": mp.best.reserved_bytes if mp.best else None,
                "breakdown": mp.best.breakdown if mp.best else None,
                "next": _point_dict(mp.next),
                "smallest": _point_dict(mp.smallest),
                "at_search_limit": mp.at_limit,
                "confirmed_full_depth": mp.confirmed,
                "confirmation": mp.confirmation,
                "n_probes": len(mp.probes),
                "curve": points,
            }
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "gpu": self.budget.gpu,
            "memory_bytes": self.budget.memory_bytes,
            "headroom": self.budget.headroom,
            "cuda_context_bytes": self.budget.context_bytes,
            "headroom_bytes": self.budget.headroom_bytes,
            "budget_bytes": self.budget.budget_bytes,
            "search": self.vary,
            "source": "simulated",
            "distributed": self.distributed,
            "assumptions": self.assumptions(),
            "methods": methods,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _point_dict(point: Point | None) -> dict | None:
    if point is None:
        return None
    return {"seq": point.seq, "batch": point.batch, "peak_bytes": point.peak_bytes,
            "reserved_bytes": point.reserved_bytes, "depth": point.depth,
            "extrapolated": point.extrapolated}


# --- The plan -------------------------------------------------------------------------------

def make_spec(model: str, methods: tuple[str, ...] = PLAN_METHODS, *, seq: int | None = None,
              batch: int = 1, dtype: str = "bf16", recipe: Recipe | None = None,
              settings=None, peft_config: dict | None = None, distributed=None):
    """The RunSpec a plan simulates (device meta), checked: ValueError (one line) for an
    unknown model, method or dtype, a bad size, targets that match nothing or an r a method
    refuses. `peft_config`: a user's LoraConfig (methods/peft_config.read), which its own
    method then trains. With `distributed` (FSDP2 over N ranks) every byte is one rank's
    (rank 0's: the full padded shards), at `batch` sequences per rank. The recipe's
    attention defaults to what SDPA runs on a recent NVIDIA GPU (flash for bf16/fp16,
    efficient for fp32); eager (or "math") materialises the L x L scores."""
    from paca_prof.distributed import Distributed
    from paca_prof.engines.step import validate_against_model
    from paca_prof.methods import MethodSettings
    from paca_prof.spec import RunSpec

    spec = RunSpec(model=model, seq=seq or 1, batch=batch, dtype=dtype, device="meta",
                   methods=tuple(methods), settings=settings or MethodSettings(),
                   recipe=recipe or Recipe(), peft_config=peft_config,
                   distributed=distributed or Distributed())
    validate_against_model(_at_depth(spec, 1))
    return spec


def plan(spec, budget: Budget, *, seq: int | None = None,
         granularity: int = DEFAULT_GRANULARITY, confirm: str = "auto",
         time_budget_s: float = DEFAULT_TIME_BUDGET_S,
         progress: Progress = lambda method, state: None) -> PlanResult:
    """Plan each method of `spec` (a RunSpec from make_spec) under `budget`: the longest
    sequence that fits at spec.batch, or with `seq` given, the largest batch that fits at that
    sequence length.

    `granularity` is the sequence grid in tokens (batches are searched exactly). `confirm`:
    "auto" simulates each answer and the next size at full depth, right after its search, if
    CONFIRM_SAFETY times its estimated time still fits in the `time_budget_s` seconds since the
    plan started; "always" does so regardless, "never" skips it. The methods are planned side
    by side, one per core (parallel.py). ValueError for bad arguments; a model the simulator
    cannot run raises its error (with the traceback of where it was raised as a note).
    """
    started = time.perf_counter()
    if granularity <= 0:
        raise ValueError(f"granularity must be positive, got {granularity}")
    if confirm not in ("auto", "always", "never"):
        raise ValueError(f"confirm must be auto, always or never, got {confirm!r}")
    vary = "seq" if seq is None else "batch"
    search = _Search(
        vary=vary, grid=granularity if vary == "seq" else 1, budget=budget.budget_bytes,
        limit=SEQ_LIMIT if vary == "seq" else BATCH_LIMIT,
        degree=2 if vary == "seq" and spec.recipe.attention == "eager" else 1,
        sized=(lambda x: (x, spec.batch)) if vary == "seq" else (lambda x: (seq, x)))
    depths = _depths(spec.config, spec.distributed.fsdp)
    deadline = None if confirm == "always" else started + time_budget_s

    def plan_method(method: str) -> MethodPlan:
        model = _MethodModel(spec, method, depths, budget)
        answer, probes = search.run(model.probe, SEQ_START if vary == "seq" else BATCH_START)
        mp = search.method_plan(method, answer, probes,
                                FULL_DEPTH if len(depths) == 1 else UNCONFIRMED_OFF)
        if len(depths) == 1 or confirm == "never":
            return mp
        if deadline is not None and (time.perf_counter() + CONFIRM_SAFETY
                                     * model.full_depth_cost_s() > deadline):
            return replace(mp, confirmation=UNCONFIRMED_TIME)
        return _confirm(mp, model, search)

    from paca_prof.methods.registry import import_libraries
    from paca_prof.parallel import run_methods

    plans = {}
    for outcome in run_methods(
            plan_method, spec.methods,
            started=lambda method: progress(
                method, f"simulating {'+'.join(map(str, depths))}-layer models"),
            warm_up=lambda: import_libraries(spec.methods)):
        if outcome.error is not None:
            outcome.error.add_note(outcome.traceback.rstrip())  # where it was raised
            raise outcome.error
        plans[outcome.method] = outcome.value
        progress(outcome.method, "searched")
    import pandas as pd

    curve = pd.concat([_curve(plans[m], search, spec.batch if vary == "seq" else seq)
                       for m in spec.methods], ignore_index=True)
    from paca_prof import methods

    return PlanResult(
        model=spec.model_name, n_layers=spec.config.num_hidden_layers, budget=budget,
        vary=vary, seq=seq, batch=spec.batch, dtype=spec.dtype, recipe=spec.recipe,
        granularity=search.grid, depths=depths, methods=plans, curve=curve,
        method_settings={m: methods.get(m).describe(spec.settings) for m in spec.methods},
        elapsed_s=time.perf_counter() - started,
        distributed=spec.distributed.describe() if spec.distributed.fsdp else None)


# --- Simulating one size at any depth -------------------------------------------------------

# A step's timeline, cut where the layer pattern is interrupted (see segment_peaks).
SEGMENTS = ("forward:start", "forward:layers", "forward:logits", "backward:logits",
            "backward:layers", "backward:end", "optimizer")


class _MethodModel:
    """Probes one method at any size: simulated at `depths` and extrapolated to the model's
    depth, or (probe_full) simulated at full depth."""

    def __init__(self, spec, method: str, depths: tuple[int, ...], budget=None):
        self.spec, self.method, self.depths, self.budget = spec, method, depths, budget
        self.n_layers = spec.config.num_hidden_layers
        # a full-depth step is replayed within the budget, as `run` replays it (the allocator
        # frees its cache and retries before it fails, as PyTorch's does): one rule for both
        self._sims = {d: _DepthSimulator(_at_depth(spec, d), method, d,
                                         budget if d == self.n_layers else None)
                      for d in depths}
        self._full: _DepthSimulator | None = None
        # reserved / peak of the last full-depth simulation: the estimate for extrapolated
        # points once one is known
        self.learned_ratio: float | None = None

    def probe(self, seq: int, batch: int) -> Point:
        """The point at full depth, extrapolated. Its reserved memory is estimated: its peak
        times reserved/peak of the last full-depth simulation, or before there is one, of the
        deepest model simulated at this size (which overestimates: the allocator's rounding
        weighs more on a smaller model; 3-layer llama3-8b models show 1.09-1.21 where the
        full model shows 1.03-1.07)."""
        points = [self._sims[d].step(seq, batch) for d in self.depths]
        if len(points) == 1:
            return points[0]
        point = _extrapolate(points[0], points[1], self.n_layers)
        ratio = self.learned_ratio or points[-1].reserved_ratio
        return replace(point, reserved_bytes=int(math.ceil(point.peak_bytes * ratio)))

    def probe_full(self, seq: int, batch: int) -> Point:
        if self._full is None:
            self._full = _DepthSimulator(self.spec, self.method, self.n_layers, self.budget)
        point = self._full.step(seq, batch)
        self.learned_ratio = point.reserved_ratio
        return point

    def full_depth_cost_s(self) -> float:
        """Estimated seconds to confirm an answer: build the full-depth model and simulate two
        steps on it (a model of replicate.SHALLOW_DEPTH layers replicated to the full depth
        where its layers are alike, engines/replicate.py; the whole depth otherwise, and
        always under FSDP2, whose simulation is not replicated). Under FSDP2 twice the steps:
        the shallow models' reserved/peak is no guide there (DESIGN.md), so the first round
        of _confirm disagrees as a rule and a second follows."""
        from paca_prof.engines import replicate

        last = self._sims[self.depths[-1]]
        whole = self.spec.distributed.fsdp or replicate.refusal(self.spec.config)
        depth = self.n_layers if whole else \
            replicate.SHALLOW_DEPTH + 1  # + 1: the replication itself, about a layer's cost
        steps = 2 * (RESERVED_ROUNDS if self.spec.distributed.fsdp else 1)
        return (last.build_s + steps * last.step_s) * depth / last.depth


class _DepthSimulator:
    """A Simulator of one method at one depth that returns its step's segment peaks; with a
    budget (budget.Budget), its reserved memory is replayed within it (Simulator.step)."""

    def __init__(self, spec, method: str, depth: int, budget=None):
        from paca_prof.engines.simulate import Simulator

        started = time.perf_counter()
        self.depth, self.budget = depth, budget
        self.sim = Simulator(spec, method)
        self.build_s = time.perf_counter() - started
        self.step_s = 0.0

    def step(self, seq: int, batch: int) -> Point:
        started = time.perf_counter()
        result = self.sim.step(seq, batch, budget=self.budget, tables=False)
        point = replace(_point(seq, batch, segment_peaks(result.memory, result.segment_cuts),
                               self.depth, extrapolated=False),
                        reserved_bytes=int(result.summary["reserved_bytes"]))
        if point.peak_bytes != result.summary["peak_bytes"]:
            raise RuntimeError(f"segment peaks ({point.peak_bytes}) disagree with the step's "
                               f"peak ({result.summary['peak_bytes']})")
        self.step_s = time.perf_counter() - started
        return point


def segment_peaks(memory: pd.DataFrame, cuts: dict[str, float] | None = None
                  ) -> dict[str, dict[str, int]]:
    """Peak of each timeline segment, as bytes per category at that segment's peak.

    `memory` is a simulated step's memory table: its first rows hold each category at the
    start, then one row per allocation or free event, in order, with the event's time (t),
    signed bytes (delta_bytes), phase and logits flag. Only allocations can make a peak; an
    allocation's segment is its phase, split at lm_head: forward before its first lm_head/loss
    allocation, and backward up to its last one, are separate from the rest. With `cuts`
    (MethodResult.segment_cuts: the times at which the second decoder layer's forward and the
    first one's backward begin) forward before the first cut and backward from the second are
    segments of their own: under FSDP2 the root's gathered parameters make the first layer's
    forward and backward unlike the others'. Within each segment the peak then sits at one
    place of the layer pattern whatever the depth, which extrapolation needs. Allocations
    between phases join the segment before them. The state at the start belongs to the first
    segment.
    """
    (forward_start, forward_layers, forward_logits, backward_logits, backward_layers,
     backward_end, optimizer) = SEGMENTS
    cuts = cuts or {}
    layers_from = cuts.get("forward", -math.inf)
    layers_until = cuts.get("backward", math.inf)
    start = len(MEMORY_CATEGORIES)
    categories = memory["category"].tolist()
    totals = dict(zip(categories[:start], (int(v) for v in memory["allocated_bytes"][:start])))
    events = list(zip(categories[start:], memory["allocated_bytes"][start:].tolist(),
                      memory["delta_bytes"][start:].tolist(), memory["phase"][start:].tolist(),
                      memory["logits_scope"][start:].tolist(), memory["t"][start:].tolist()))
    last_backward_logits = max((i for i, (_, _, delta, phase, logits, _) in enumerate(events)
                                if phase == "backward" and delta > 0 and logits), default=-1)
    total = sum(totals.values())
    segment, seen_logits = (forward_start if cuts else forward_layers), False
    peaks: dict[str, tuple[int, dict[str, int]]] = {segment: (total, dict(totals))}
    for i, (category, allocated, delta, phase, logits, t) in enumerate(events):
        totals[category] = int(allocated)
        total += delta
        if delta <= 0:
            continue
        if phase == "forward":
            seen_logits = seen_logits or bool(logits)
            segment = (forward_logits if seen_logits else
                       forward_layers if t >= layers_from else forward_start)
        elif phase == "backward":
            segment = (backward_logits if i <= last_backward_logits else
                       backward_end if t >= layers_until else backward_layers)
        elif phase == "optimizer":
            segment = optimizer
        if total > peaks.get(segment, (-1,))[0]:
            peaks[segment] = (total, dict(totals))
    return {name: breakdown for name, (_, breakdown) in peaks.items()}


def _segment_names(points: list[Point]) -> list[str]:
    """The segments any of `points` has, in timeline order (ties go to the earliest)."""
    names = set().union(*(p.segments for p in points))
    return [name for name in SEGMENTS if name in names]


def _point(seq: int, batch: int, segments: dict[str, dict[str, int]], depth: int,
           extrapolated: bool) -> Point:
    """A Point whose peak is the largest of its segments' peaks."""
    name = max(segments, key=lambda s: sum(segments[s].values()))
    breakdown = {c: int(segments[name].get(c, 0)) for c in MEMORY_CATEGORIES}
    return Point(seq, batch, sum(breakdown.values()), breakdown, segments, depth, extrapolated)


def _extrapolate(low: Point, high: Point, depth: int) -> Point:
    """Segment by segment and category by category, from depths d and d+1 to `depth`."""
    if high.depth != low.depth + 1:
        raise ValueError(f"extrapolation needs depths d and d+1, got {low.depth}, {high.depth}")
    steps = depth - low.depth
    segments = {}
    for name in _segment_names([low, high]):
        a, b = low.segments.get(name, {}), high.segments.get(name, {})
        segments[name] = {c: a.get(c, 0) + steps * (b.get(c, 0) - a.get(c, 0))
                          for c in MEMORY_CATEGORIES}
    return _point(low.seq, low.batch, segments, depth, extrapolated=True)


def _at_depth(spec, depth: int):
    """A copy of `spec` whose model has `depth` decoder layers (engines/replicate.at_depth)."""
    from paca_prof.engines.replicate import at_depth

    return at_depth(spec, depth)


def _depths(config, fsdp: bool = False) -> tuple[int, ...]:
    """The depths simulated and extrapolated (one: the model's own, simulated throughout).
    Under FSDP2 one layer deeper: the middle layers' segment (segment_peaks' cuts) must hold
    both the layer that prefetches the last one and the last one."""
    depths = FSDP_DEPTHS if fsdp else DEPTHS
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if n_layers <= depths[-1] or (layer_types and len(set(layer_types)) > 1):
        return (n_layers,)
    return depths


# --- Search ---------------------------------------------------------------------------------

@dataclass
class Bracket:
    """What a search knows: the smallest size known not to fit (None while none is known) and
    the largest size known to fit below it, on a grid up to a limit.

    Reserved memory need not grow with the size (full fine-tuning's blocks fragment otherwise
    at each length), so a probe may fit above one that does not. Such a fit is never the
    answer: a run whose batches vary in length reaches every size below its longest."""

    grid: int
    limit: int
    fails: int | None = None
    fitted: set[int] = field(default_factory=set)

    def record(self, size: int, fitted: bool) -> None:
        if fitted:
            self.fitted.add(size)
        else:
            self.fails = size if self.fails is None else min(self.fails, size)

    @property
    def fits(self) -> int:
        """The largest size known to fit below the smallest known not to (0: none)."""
        return max((x for x in self.fitted if self.fails is None or x < self.fails), default=0)

    @property
    def done(self) -> bool:
        """Closed: the answer fits and the next grid size does not, or the limit fits."""
        return (self.fails is not None and self.fails - self.fits <= self.grid) or \
            self.fits >= self.limit

    def clamp(self, guess: int) -> int:
        """A guess moved strictly inside the bracket, on the grid."""
        upper = self.limit if self.fails is None else self.fails - self.grid
        return min(upper, max(self.fits + self.grid, guess))

    def bisect(self) -> int:
        """The middle of the bracket, or four times the known fit while nothing fails."""
        if self.fails is None:
            return 4 * max(self.fits, self.grid)
        return (self.fits + self.fails) // 2 // self.grid * self.grid


@dataclass
class _Search:
    """One plan's search rule: what varies, on which grid, under which budget, and how a size
    becomes a (seq, batch)."""

    vary: str
    grid: int
    budget: int
    limit: int
    degree: int  # of the peak in the size: 2 for seq with eager attention, else 1
    sized: Callable[[int], tuple[int, int]]

    def run(self, probe: Callable[[int, int], Point], start: tuple[int, ...],
            seed: list[Point] = ()) -> tuple[int, dict[int, Point]]:
        """The largest grid size in [0, limit] whose probed peak fits, assuming the peak grows
        with size, and every probe {size: Point}. Probes the start sizes (the second one small
        if the first does not fit), then jumps to the crossing fitted through the nearest
        probes (MAX_FITTED_JUMPS times at most, then bisection) and probes its neighbour, until
        the bracket closes. `seed` points count as probes already made."""
        bracket = Bracket(self.grid, self.limit)
        probes: dict[int, Point] = {}

        def probe_at(x: int) -> None:
            if x not in probes:
                probes[x] = probe(*self.sized(x))
            bracket.record(x, probes[x].reserved_bytes <= self.budget)

        for point in seed:
            probes[_size(point, self.vary)] = point
            probe_at(_size(point, self.vary))
        for x in start:
            if bracket.done:
                break
            probe_at(self.grid if bracket.fails is not None
                     else min(self.limit, max(self.grid, x // self.grid * self.grid)))
        jumps = 0
        while not bracket.done:
            guess = None
            if jumps < MAX_FITTED_JUMPS:
                near = bracket.fits if bracket.fails is None else (bracket.fits
                                                                   + bracket.fails) / 2
                guess = _predict_crossing(list(probes.values()), self, near)
            guess = bracket.clamp(bracket.bisect() if guess is None else guess)
            jumps += 1
            probe_at(guess)
            if guess == bracket.fits and guess + self.grid <= self.limit and (
                    bracket.fails is None or guess + self.grid < bracket.fails):
                probe_at(guess + self.grid)  # it fits: does the next one?
            elif guess != bracket.fits and guess - self.grid > bracket.fits:
                probe_at(guess - self.grid)  # it does not: does the one before?
        return bracket.fits, probes

    def method_plan(self, method: str, answer: int, probes: dict[int, Point],
                    confirmation: str) -> MethodPlan:
        ordered = [probes[x] for x in sorted(probes)]
        return MethodPlan(
            method=method, vary=self.vary, max_size=answer, best=probes.get(answer),
            next=probes.get(answer + self.grid), smallest=probes.get(self.grid) or ordered[0],
            at_limit=answer >= self.limit, confirmation=confirmation, probes=ordered)


def _predict_crossing(points: list[Point], search: _Search, near: float) -> int | None:
    """The largest grid size whose fitted peak fits the budget, by the fit through the probes
    nearest `near`; None if the probes cannot say (fewer than two)."""
    if len(points) < 2:
        return None
    chosen = sorted(points, key=lambda p: abs(_size(p, search.vary) - near))[:search.degree + 1]
    xs = [float(_size(p, search.vary)) for p in chosen]
    crossing = math.inf
    for name in _segment_names(chosen):  # reserved memory, as each probe relates it to bytes
        ys = [sum(p.segments.get(name, {}).values()) * p.reserved_ratio for p in chosen]
        crossing = min(crossing, _largest_within(xs, ys, search.budget, search.limit))
    if crossing == math.inf:
        return search.limit
    return max(0, int(crossing // search.grid) * search.grid)


def _largest_within(xs: list[float], ys: list[float], budget: int, limit: int) -> float:
    """Largest x in [0, limit] where the polynomial through (xs, ys) stays within budget,
    assuming it grows with x (math.inf if it never exceeds the budget below limit)."""
    if _poly_at(xs, ys, limit) <= budget:
        return math.inf
    lo, hi = 0.0, float(limit)
    if _poly_at(xs, ys, lo) > budget:
        return 0.0
    for _ in range(60):  # bisection on a smooth function: exact enough for a grid of >= 1
        mid = (lo + hi) / 2
        if _poly_at(xs, ys, mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _poly_at(xs: list[float], ys: list[float], x: float) -> float:
    """The polynomial through (xs, ys) (Lagrange form, degree len-1) at x."""
    value = 0.0
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        term = float(yi)
        for j, xj in enumerate(xs):
            if j != i:
                term *= (x - xj) / (xi - xj)
        value += term
    return value


def _size(point: Point, vary: str) -> int:
    return point.seq if vary == "seq" else point.batch


# --- Confirmation at full depth -------------------------------------------------------------

def _confirm(mp: MethodPlan, model: _MethodModel, search: _Search) -> MethodPlan:
    """Simulate the answer and the next size at full depth. On disagreement (mostly the
    reserved estimate: extrapolated points then take reserved/peak from the full-depth
    simulation) search the extrapolated points again and confirm once more; should that
    disagree too, search on at full depth."""
    full: dict[int, Point] = {}
    for attempt in range(RESERVED_ROUNDS):
        sizes = [x for x in (mp.max_size, mp.max_size + search.grid)
                 if search.grid <= x <= search.limit]
        full.update({x: model.probe_full(*search.sized(x)) for x in sizes if x not in full})
        if all((full[x].reserved_bytes <= search.budget) == (x <= mp.max_size) for x in sizes):
            by_size = {_size(p, mp.vary): p for p in mp.probes} | full
            return search.method_plan(mp.method, mp.max_size, by_size, CONFIRMED)
        answer, probes = search.run(model.probe, (), seed=list(full.values()))
        mp = search.method_plan(mp.method, answer, probes, mp.confirmation)
    answer, probes = search.run(model.probe_full, (), seed=list(full.values()))
    return search.method_plan(mp.method, answer, probes, CORRECTED)


# --- The curve ------------------------------------------------------------------------------

def _curve(mp: MethodPlan, search: _Search, fixed: int) -> pd.DataFrame:
    """~CURVE_POINTS grid sizes up to CURVE_SPAN x the answer (up to the largest probe if
    nothing fits), with the probes in that range: bytes per category, probed or fitted."""
    import pandas as pd

    grid = search.grid
    top = mp.max_size * CURVE_SPAN if mp.fits else max(_size(p, mp.vary) for p in mp.probes)
    sizes = {max(grid, int(round(top * (i + 1) / CURVE_POINTS / grid)) * grid)
             for i in range(CURVE_POINTS)}
    by_size = {_size(p, mp.vary): p for p in mp.probes}
    sizes |= {x for x in by_size if x <= max(top, mp.max_size + grid)}
    rows = []
    for x in sorted(sizes):
        probed = x in by_size
        if probed:
            breakdown, reserved = by_size[x].breakdown, by_size[x].reserved_bytes
        else:  # reserved as the nearest probe relates it to the peak
            breakdown = _fit_predict(mp.probes, x, mp.vary, search.degree)
            nearest = min(mp.probes, key=lambda p: (abs(_size(p, mp.vary) - x), _size(p, mp.vary)))
            reserved = int(math.ceil(sum(breakdown.values()) * nearest.reserved_ratio))
        seq, batch = (x, fixed) if mp.vary == "seq" else (fixed, x)
        for category in MEMORY_CATEGORIES:
            rows.append({"method": mp.method, "seq": seq, "batch": batch, "category": category,
                         "bytes": int(breakdown[category]), "probed": probed,
                         "reserved_bytes": reserved})
    return pd.DataFrame(rows).astype({"method": "string", "seq": "int64", "batch": "int64",
                                      "category": "string", "bytes": "int64",
                                      "probed": "bool", "reserved_bytes": "Int64"})


def _fit_predict(points: list[Point], x: float, vary: str, degree: int) -> dict[str, int]:
    """Bytes per category at size x, fitted per segment through the degree+1 probes nearest x
    (fewer if there are fewer), then the largest segment (as _point does)."""
    chosen = sorted(points, key=lambda p: (abs(_size(p, vary) - x), _size(p, vary)))
    chosen = chosen[:degree + 1]
    xs = [float(_size(p, vary)) for p in chosen]
    best, best_total = None, -math.inf
    for name in _segment_names(chosen):
        fitted = {c: _poly_at(xs, [p.segments.get(name, {}).get(c, 0) for p in chosen], x)
                  for c in MEMORY_CATEGORIES}
        total = sum(fitted.values())
        if total > best_total:
            best, best_total = fitted, total
    return {c: int(round(v)) for c, v in best.items()}


# --- The plan as a trace folder -------------------------------------------------------------

def write_trace(result: PlanResult, spec, out: Path, command: str) -> Path:
    """Write the plan as a trace folder (source simulated): a summary row per method with its
    answer (max_seq or max_batch) and the peak's breakdown there, and the curve as the
    capacity table, so the analyzer and the dashboard can show it without simulating. The GPU
    planned for is recorded (run.yaml gpu), so the dashboard opens on it."""
    import pandas as pd

    from paca_prof import engines, trace
    from paca_prof.results import summary_row

    engines.check_out(out)
    run = engines.spec_metadata(spec, command)
    run["device"] = {"type": "meta", "name": f"{result.budget.gpu or 'memory budget'} (planned)",
                     "memory_bytes": result.budget.memory_bytes}
    run["gpu"] = result.budget.device.to_dict() if result.budget.device else None
    run["plan"] = {key: value for key, value in result.to_dict().items()
                   if key in ("budget_bytes", "headroom", "headroom_bytes",
                              "cuda_context_bytes", "search", "gpu")}
    run["assumptions"] = {**run["assumptions"], **result.assumptions()}
    key = f"max_{result.vary}"
    rows = []
    for name, mp in result.methods.items():
        best = mp.best
        rows.append(summary_row(name, "ok" if mp.fits else "oom",
                                peak_breakdown=best.breakdown if best else None,
                                **({"reserved_bytes": best.reserved_bytes} if best else {}),
                                **{key: mp.max_size}))
    return trace.write(out, run, {"summary": pd.DataFrame(rows), "capacity": result.curve})
