"""Capacity planner: the longest sequence (or the largest batch) each method can train on a GPU.

    budget = GPU memory (or a given amount) - headroom
    answer = the largest size, on a grid, whose simulated peak memory of one training step
             (forward, loss, backward, AdamW step) is at most the budget

Headroom. A simulated peak counts tensor bytes only (engines/simulate.py). A real GPU also holds
the CUDA context (cuBLAS/cuDNN handles and kernels: 0.3-1 GiB), and PyTorch's caching allocator
rounds blocks and fragments (typically a few percent of what it holds). Both are kept back by an
explicit headroom, DEFAULT_HEADROOM = "1GiB+5%": 1 GiB for the CUDA context plus 5% of the
device memory for allocator slack (5.0 GiB of an 80 GiB A100). Any sum of byte sizes and
percentages of the device memory is accepted ("2GiB", "10%", "0"); every answer states it.

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
Models of 3 layers or fewer, or with unequal layer types, are simulated at full depth.

Search. Peak memory grows with the sequence: affine with fused attention (flash, efficient),
quadratic with eager attention, affine in the batch always, per segment. Two probes (1024 and
4096 tokens, or batch 1 and 4) are fitted per segment to jump to the predicted crossing; the
answer is then bracketed by real probes, one grid step apart: max fits, max + step does not.
The grid is `granularity` tokens (default 64) for sequences and 1 for batches. When the time
budget allows, both ends are then simulated at full depth ("confirmed"); were they to disagree,
the search continues at full depth.

Curve. Peak bytes by category at ~10 sizes up to 1.25x the answer, per method: the probed sizes
are simulations, the others are fitted per segment through the nearest probes (exact where the
segment is affine/quadratic in size, as with flash/eager attention); `probed` tells which.

Limits: what the simulation does not model (allocator rounding, kernel workspaces, the CUDA
context) is what the headroom is for; peak memory is assumed to grow with size (it does for
every method here); sequences are searched up to SEQ_LIMIT tokens and batches up to BATCH_LIMIT
(an answer at the limit says so); the model's max_position_embeddings is not enforced.

This module imports torch only inside the functions that simulate; the budget is budget.py's and
the result classes are pandas-only. The curve has the columns of the analyzer's
capacity sweep (paca_prof.analyze.capacity), whose max_seq_from_curve re-reads it for another
budget without simulating.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from paca_prof.budget import DEFAULT_HEADROOM, HEADROOM_MEANING, Budget
from paca_prof.trace import MEMORY_CATEGORIES

PLAN_METHODS = ("lora", "dora", "paca", "full")  # frozen trains nothing: ask for it explicitly
DEFAULT_GRANULARITY = 64  # tokens
SEQ_LIMIT = 1 << 20  # 1,048,576 tokens
BATCH_LIMIT = 1 << 16
SEQ_START = (1024, 4096)
BATCH_START = (1, 4)
DEPTHS = (2, 3)  # simulated depths that are extrapolated to the model's
CURVE_POINTS = 10
CURVE_SPAN = 1.25  # the curve runs up to 1.25x the answer
DEFAULT_TIME_BUDGET_S = 20.0  # full-depth confirmation runs only while the plan stays within it
CONFIRM_SAFETY = 1.5  # a confirmation starts only if 1.5x its estimated time fits the budget

Progress = Callable[[str, str], None]  # (method, what is happening)


# --- Results --------------------------------------------------------------------------------

@dataclass
class Point:
    """One simulated (or extrapolated) step at one size: its peak, with the bytes of each
    memory category at the peak, and each segment's peak (for fitting)."""

    seq: int
    batch: int
    peak_bytes: int
    breakdown: dict[str, int]
    segments: dict[str, dict[str, int]]
    depth: int  # the depth simulated; extrapolated points give the model's depth
    extrapolated: bool


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
    attention: str
    grad_ckpt: bool
    granularity: int
    depths: tuple[int, ...]
    methods: dict[str, MethodPlan]
    curve: pd.DataFrame
    method_settings: dict[str, dict]
    elapsed_s: float

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
            "attention": self.attention,
            "dtype": self.dtype,
            "grad_ckpt": self.grad_ckpt,
            "batch": self.batch if self.vary == "seq" else "searched",
            "seq": self.seq if self.vary == "batch" else "searched",
            "granularity": self.granularity,
            "granularity_unit": "tokens" if self.vary == "seq" else "sequences",
            "memory": "simulated on the meta device (paca_prof.engines.simulate): exact tensor "
                      "bytes alive at the peak of one training step (forward, loss, backward, "
                      "AdamW step, zero_grad); no allocator rounding, no kernel workspaces, "
                      "no CUDA context: those are the headroom's",
            "depth": depth,
            "headroom": f"{self.budget.headroom}"
                        + (f" ({HEADROOM_MEANING})" if self.budget.headroom == DEFAULT_HEADROOM
                           else ""),
            "optimizer": "torch.optim.AdamW (foreach), state in the trainable parameters' dtype",
            "curve": f"~{CURVE_POINTS} sizes up to {CURVE_SPAN}x the answer; probed sizes "
                     "simulated, others fitted per segment through the nearest probes",
            "methods": self.method_settings,
        }

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
                               "peak_bytes": sum(by_cat.values()), "probed": bool(probed),
                               "breakdown": by_cat})
            methods[name] = {
                key: mp.max_size,
                "fits": mp.fits,
                "peak_bytes": mp.best.peak_bytes if mp.best else None,
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
            "headroom_bytes": self.budget.headroom_bytes,
            "budget_bytes": self.budget.budget_bytes,
            "search": self.vary,
            "source": "simulated",
            "assumptions": self.assumptions(),
            "methods": methods,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _point_dict(point: Point | None) -> dict | None:
    if point is None:
        return None
    return {"seq": point.seq, "batch": point.batch, "peak_bytes": point.peak_bytes,
            "depth": point.depth, "extrapolated": point.extrapolated}


# --- Simulating one size at any depth -------------------------------------------------------

# A step's timeline, cut where the layer pattern is interrupted (see _segment_peaks).
SEGMENTS = ("forward:layers", "forward:logits", "backward:logits", "backward:layers",
            "optimizer")


def _segment_peaks(memory: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Peak of each timeline segment, as bytes per category at that segment's peak.

    `memory` is a simulated step's memory table: one row per category at t=0, then one per
    allocation or free event, in order, with the event's phase and logits_scope. Only
    allocations can make a peak; an allocation's segment is its phase, split at lm_head:
    forward before its first lm_head/loss allocation, and backward up to its last one, are
    separate from the rest; allocations between phases join the segment before them. The state
    at the start belongs to the first segment.
    """
    n0 = len(MEMORY_CATEGORIES)
    forward_layers, forward_logits, backward_logits, backward_layers, optimizer = SEGMENTS
    categories = memory["category"].tolist()
    values = [int(v) for v in memory["allocated_bytes"].tolist()]
    phases = memory["phase"].tolist()
    logits = memory["logits_scope"].tolist()
    totals = dict(zip(categories[:n0], values[:n0]))
    total = sum(totals.values())
    allocates = []  # per event row: does it allocate (its category's total grows)?
    running = dict(totals)
    for category, value in zip(categories[n0:], values[n0:]):
        allocates.append(value > running[category])
        running[category] = value
    last_backward_logits = max((i for i, phase in enumerate(phases[n0:]) if phase == "backward"
                                and allocates[i] and logits[n0 + i]), default=-1)
    segment, seen_logits = forward_layers, False
    peaks: dict[str, tuple[int, dict[str, int]]] = {segment: (total, dict(totals))}
    for i, (category, value) in enumerate(zip(categories[n0:], values[n0:])):
        total += value - totals[category]
        totals[category] = value
        if not allocates[i]:
            continue
        phase = phases[n0 + i]
        if phase == "forward":
            seen_logits = seen_logits or bool(logits[n0 + i])
            segment = forward_logits if seen_logits else forward_layers
        elif phase == "backward":
            segment = backward_logits if i <= last_backward_logits else backward_layers
        elif phase == "optimizer":
            segment = optimizer
        if total > peaks.get(segment, (-1,))[0]:
            peaks[segment] = (total, dict(totals))
    return {name: breakdown for name, (_, breakdown) in peaks.items()}


class _DepthSimulator:
    """A Simulator of one method at one depth that also returns its step's segment peaks."""

    def __init__(self, spec, method: str, depth: int):
        from paca_prof.engines.simulate import Simulator

        started = time.perf_counter()
        self.depth = depth
        self.sim = Simulator(spec, method)
        self.build_s = time.perf_counter() - started
        self.step_s = 0.0

    def step(self, seq: int, batch: int) -> Point:
        started = time.perf_counter()
        result = self.sim.step(seq, batch)
        segments = _segment_peaks(result.memory)
        point = _point(seq, batch, segments, self.depth, extrapolated=False)
        if point.peak_bytes != result.summary["peak_bytes"]:
            raise RuntimeError(f"segment peaks ({point.peak_bytes}) disagree with the step's "
                               f"peak ({result.summary['peak_bytes']})")
        self.step_s = time.perf_counter() - started
        return point


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
    assert high.depth == low.depth + 1, (low.depth, high.depth)
    steps = depth - low.depth
    segments = {}
    for name in _segment_names([low, high]):
        a, b = low.segments.get(name, {}), high.segments.get(name, {})
        segments[name] = {c: a.get(c, 0) + steps * (b.get(c, 0) - a.get(c, 0))
                          for c in MEMORY_CATEGORIES}
    return _point(low.seq, low.batch, segments, depth, extrapolated=True)


class _MethodModel:
    """Probes one method at any size: simulated at DEPTHS and extrapolated, or at full depth."""

    def __init__(self, spec, method: str, n_layers: int, depths: tuple[int, ...]):
        self.spec, self.method, self.n_layers, self.depths = spec, method, n_layers, depths
        self._sims = {d: _DepthSimulator(_at_depth(spec, d), method, d) for d in depths}
        self._full: _DepthSimulator | None = None

    def probe(self, seq: int, batch: int) -> Point:
        points = [self._sims[d].step(seq, batch) for d in self.depths]
        if len(points) == 1:
            return points[0]
        return _extrapolate(points[0], points[1], self.n_layers)

    def probe_full(self, seq: int, batch: int) -> Point:
        if self._full is None:
            self._full = _DepthSimulator(self.spec, self.method, self.n_layers)
        return self._full.step(seq, batch)

    def full_depth_cost_s(self) -> float:
        """Estimated seconds to build the full-depth model and simulate two steps on it."""
        last = self._sims[self.depths[-1]]
        scale = self.n_layers / last.depth
        return (last.build_s + 2 * last.step_s) * scale


def _at_depth(spec, depth: int):
    """A copy of `spec` whose model has `depth` decoder layers (a deep-copied config)."""
    config = copy.deepcopy(spec.config)
    config.num_hidden_layers = depth
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:depth]
    truncated = copy.copy(spec)
    truncated.config = config
    return truncated


def _depths(config) -> tuple[int, ...]:
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if n_layers <= DEPTHS[-1] or (layer_types and len(set(layer_types)) > 1):
        return (n_layers,)
    return DEPTHS


# --- Search ---------------------------------------------------------------------------------

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


def _predict_crossing(points: list[Point], budget: int, vary: str, degree: int,
                      near: float, grid: int, limit: int) -> int | None:
    """The largest grid size whose fitted peak fits, by the fit through the probes nearest
    `near`; None if the probes cannot say (fewer than two)."""
    if len(points) < 2:
        return None
    chosen = sorted(points, key=lambda p: abs(_size(p, vary) - near))[:degree + 1]
    xs = [float(_size(p, vary)) for p in chosen]
    totals_by_segment = {}
    for name in _segment_names(chosen):
        totals_by_segment[name] = [sum(p.segments.get(name, {}).values()) for p in chosen]
    crossing = math.inf
    for ys in totals_by_segment.values():
        crossing = min(crossing, _largest_within(xs, ys, budget, limit))
    if crossing == math.inf:
        return limit
    return max(0, int(crossing // grid) * grid)


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


def _search(probe: Callable[[int], Point], budget: int, vary: str, grid: int, limit: int,
            start: tuple[int, ...], degree: int, seed: list[Point] = ()) -> tuple[int, dict]:
    """Largest multiple of `grid` in [0, limit] whose probed peak fits `budget`, assuming the
    peak grows with size. Probes the start sizes (the second one small if the first does not
    fit), then repeatedly jumps to the crossing fitted through the nearest probes and probes
    its neighbour too, until one size fits and the next grid size does not; after two jumps
    that do not close the bracket it bisects. Returns the answer and every probe {size: Point}
    (seed points count as probes already made)."""
    probes: dict[int, Point] = {}
    lo, hi = 0, None  # largest size known to fit, smallest known not to

    def run(x: int) -> None:
        nonlocal lo, hi
        if x not in probes:
            probes[x] = probe(x)
        if probes[x].peak_bytes <= budget:
            lo = max(lo, x)
        else:
            hi = x if hi is None else min(hi, x)

    def done() -> bool:
        return (hi is not None and hi - lo <= grid) or lo >= limit

    for point in seed:
        probes[_size(point, vary)] = point
        run(_size(point, vary))
    for x in start:
        if done():
            break
        x = grid if hi is not None else min(limit, max(grid, x // grid * grid))
        run(x)
    jumps = 0
    while not done():
        guess = None
        if jumps < 2:
            near = lo if hi is None else (lo + hi) / 2
            guess = _predict_crossing(list(probes.values()), budget, vary, degree, near, grid,
                                      limit)
        if guess is None:  # bisect, or grow while nothing is known not to fit
            guess = (lo + hi) // 2 // grid * grid if hi is not None else 4 * max(lo, grid)
        guess = min(limit if hi is None else hi - grid, max(lo + grid, guess))
        jumps += 1
        run(guess)
        if guess == lo and guess + grid <= limit and (hi is None or guess + grid < hi):
            run(guess + grid)  # it fits: does the next one?
        elif guess != lo and guess - grid > lo:
            run(guess - grid)  # it does not: does the one before?
    return lo, probes


# --- The plan -------------------------------------------------------------------------------

def make_spec(model: str, methods: tuple[str, ...] = PLAN_METHODS, *, seq: int | None = None,
              batch: int = 1, dtype: str = "bf16", attention: str | None = None,
              grad_ckpt: bool = False, settings=None):
    """The RunSpec a plan simulates (device meta), checked: ValueError (one line) for an
    unknown model, method or dtype, a bad size, or a rank too large for the model. Attention
    defaults to what SDPA runs on a recent NVIDIA GPU: flash for bf16/fp16, efficient for fp32;
    eager (or "math") materialises the L x L scores."""
    from paca_prof import methods as method_registry
    from paca_prof.engines.attention import default_attention
    from paca_prof.engines.common import RunSpec, validate_against_model
    from paca_prof.presets import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    attention = {"math": "eager"}.get(attention, attention) or default_attention(DTYPES[dtype])
    if attention not in ("flash", "efficient", "eager"):
        raise ValueError(f"unknown attention {attention!r}; choose from flash, efficient, eager")
    spec = RunSpec(model=model, seq=seq or 1, batch=batch, dtype=dtype, device="meta",
                   methods=tuple(methods),
                   settings=settings or method_registry.MethodSettings(),
                   attention=attention, grad_ckpt=grad_ckpt)
    validate_against_model(_at_depth(spec, 1))
    return spec


def plan(model, budget: Budget, methods: tuple[str, ...] = PLAN_METHODS, *,
         seq: int | None = None, batch: int = 1, dtype: str = "bf16",
         attention: str | None = None, grad_ckpt: bool = False, settings=None,
         granularity: int = DEFAULT_GRANULARITY, confirm: str = "auto",
         time_budget_s: float = DEFAULT_TIME_BUDGET_S,
         progress: Progress = lambda method, state: None) -> PlanResult:
    """Plan each method under `budget`: the longest sequence that fits at `batch`, or with
    `seq` given, the largest batch that fits at that sequence length.

    `model` is a preset name, a config path, or a RunSpec from make_spec (then methods,
    batch, dtype, attention, grad_ckpt and settings come from it; `seq` still chooses the
    batch search). `granularity` is the sequence grid in tokens (batches are searched
    exactly). `confirm`: "auto" simulates each answer and the next size at full depth while
    the whole plan stays within `time_budget_s` seconds (the cheapest methods first; one starts
    only if CONFIRM_SAFETY times its estimated time fits), "always" does so regardless, "never"
    skips it. ValueError for bad arguments; a model the simulator cannot run raises its error.
    """
    from paca_prof import methods as method_registry

    started = time.perf_counter()
    if granularity <= 0:
        raise ValueError(f"granularity must be positive, got {granularity}")
    if confirm not in ("auto", "always", "never"):
        raise ValueError(f"confirm must be auto, always or never, got {confirm!r}")
    spec = model if not isinstance(model, str) else make_spec(
        model, methods, seq=seq, batch=batch, dtype=dtype, attention=attention,
        grad_ckpt=grad_ckpt, settings=settings)
    vary = "seq" if seq is None else "batch"
    grid = granularity if vary == "seq" else 1
    limit = SEQ_LIMIT if vary == "seq" else BATCH_LIMIT
    start = SEQ_START if vary == "seq" else BATCH_START
    degree = 2 if vary == "seq" and spec.attention == "eager" else 1
    n_layers = spec.config.num_hidden_layers
    depths = _depths(spec.config)

    def sized(x: int) -> tuple[int, int]:
        return (x, spec.batch) if vary == "seq" else (seq, x)

    models, plans = {}, {}
    for method in spec.methods:
        progress(method, f"simulating {'+'.join(map(str, depths))}-layer models")
        models[method] = _MethodModel(spec, method, n_layers, depths)
        answer, probes = _search(lambda x, m=models[method]: m.probe(*sized(x)),
                                 budget.budget_bytes, vary, grid, limit, start, degree)
        plans[method] = _method_plan(method, vary, answer, probes, grid, limit,
                                     FULL_DEPTH if len(depths) == 1 else UNCONFIRMED_OFF)
        progress(method, "searched")
    for method in sorted(spec.methods, key=lambda m: models[m].full_depth_cost_s()):
        mp, mm = plans[method], models[method]  # cheapest first: confirm as many as time allows
        if len(depths) == 1 or confirm == "never":
            continue
        elapsed = time.perf_counter() - started
        if confirm == "auto" and elapsed + CONFIRM_SAFETY * mm.full_depth_cost_s() > time_budget_s:
            mp.confirmation = UNCONFIRMED_TIME
            continue
        progress(method, f"confirming at full depth ({n_layers} layers)")
        plans[method] = _confirm(mp, mm, sized, budget.budget_bytes, grid, limit, degree)
        progress(method, "confirmed")
    curve = pd.concat([_curve(plans[m], grid, degree, spec.batch if vary == "seq" else seq)
                       for m in spec.methods], ignore_index=True)
    return PlanResult(
        model=spec.model_name, n_layers=n_layers, budget=budget, vary=vary,
        seq=seq, batch=spec.batch, dtype=spec.dtype,
        attention=spec.attention, grad_ckpt=spec.grad_ckpt, granularity=grid, depths=depths,
        methods=plans, curve=curve,
        method_settings={m: method_registry.describe(m, spec.settings) for m in spec.methods},
        elapsed_s=time.perf_counter() - started)


def _method_plan(method: str, vary: str, answer: int, probes: dict[int, Point], grid: int,
                 limit: int, confirmation: str) -> MethodPlan:
    ordered = [probes[x] for x in sorted(probes)]
    return MethodPlan(
        method=method, vary=vary, max_size=answer, best=probes.get(answer),
        next=probes.get(answer + grid), smallest=probes.get(grid) or ordered[0],
        at_limit=answer >= limit, confirmation=confirmation, probes=ordered)


def _confirm(mp: MethodPlan, mm: _MethodModel, sized, budget: int, grid: int, limit: int,
             degree: int) -> MethodPlan:
    """Simulate the answer and the next size at full depth; on disagreement, search on at full
    depth from there."""
    sizes = [x for x in (mp.max_size, mp.max_size + grid) if grid <= x <= limit]
    full = {x: mm.probe_full(*sized(x)) for x in sizes}
    agrees = all((full[x].peak_bytes <= budget) == (x <= mp.max_size) for x in full)
    if agrees:
        by_size = {_size(p, mp.vary): p for p in mp.probes} | full
        return _method_plan(mp.method, mp.vary, mp.max_size, by_size, grid, limit, CONFIRMED)
    answer, probes = _search(lambda x: mm.probe_full(*sized(x)), budget, mp.vary, grid, limit,
                             (), degree, seed=list(full.values()))
    return _method_plan(mp.method, mp.vary, answer, probes, grid, limit, CORRECTED)


def _curve(mp: MethodPlan, grid: int, degree: int, fixed: int) -> pd.DataFrame:
    """~CURVE_POINTS grid sizes up to CURVE_SPAN x the answer (up to the largest probe if
    nothing fits), with the probes in that range: bytes per category, probed or fitted."""
    top = mp.max_size * CURVE_SPAN if mp.fits else max(_size(p, mp.vary) for p in mp.probes)
    sizes = {max(grid, int(round(top * (i + 1) / CURVE_POINTS / grid)) * grid)
             for i in range(CURVE_POINTS)}
    by_size = {_size(p, mp.vary): p for p in mp.probes}
    sizes |= {x for x in by_size if x <= max(top, mp.max_size + grid)}
    rows = []
    for x in sorted(sizes):
        probed = x in by_size
        breakdown = by_size[x].breakdown if probed else _fit_predict(mp.probes, x, mp.vary,
                                                                     degree)
        seq, batch = (x, fixed) if mp.vary == "seq" else (fixed, x)
        for category in MEMORY_CATEGORIES:
            rows.append({"method": mp.method, "seq": seq, "batch": batch, "category": category,
                         "bytes": int(breakdown[category]), "probed": probed})
    return pd.DataFrame(rows).astype({"method": "string", "seq": "int64", "batch": "int64",
                                      "category": "string", "bytes": "int64",
                                      "probed": "bool"})



def write_trace(result: PlanResult, spec, out: Path, command: str) -> Path:
    """Write the plan as a trace folder (source simulated): a summary row per method with its
    answer (max_seq or max_batch) and the peak's breakdown there, and the curve as the
    capacity table, so the analyzer and the dashboard can show it without simulating."""
    from paca_prof import engines, trace
    from paca_prof.results import summary_row

    engines.check_out(out)
    run = engines.run_metadata(spec, command)
    run["device"] = {"type": "meta", "name": f"{result.budget.gpu or 'memory budget'} (planned)",
                     "memory_bytes": result.budget.memory_bytes}
    run["plan"] = {key: value for key, value in result.to_dict().items()
                   if key in ("budget_bytes", "headroom", "headroom_bytes", "search", "gpu")}
    run["assumptions"] = {**run["assumptions"], **result.assumptions()}
    key = f"max_{result.vary}"
    rows = []
    for name, mp in result.methods.items():
        best = mp.best
        rows.append(summary_row(name, "ok" if mp.fits else "oom",
                                peak_breakdown=best.breakdown if best else None,
                                **{key: mp.max_size}))
    capacity = result.curve.drop(columns=["probed"], errors="ignore").assign(
        probed=result.curve.get("probed", True))
    return trace.write(out, run, {"summary": pd.DataFrame(rows), "capacity": capacity})
