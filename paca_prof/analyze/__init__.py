"""The analyzer: one front object over a loaded trace, delegating to small analyses that each
return a DataFrame (in the style of Holistic Trace Analysis). Pandas only; no torch here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from paca_prof import trace as trace_io
from paca_prof.analyze import analyses, compare, overview


class TraceAnalysis:
    """Analyses of one trace folder (measured, simulated or projected).

    Every method returns a new DataFrame; none changes the trace. `methods` arguments default
    to every method in the trace; naming one the trace lacks raises ValueError.
    """

    def __init__(self, source: str | Path | trace_io.Trace, rank: int = 0):
        """`rank`: the rank whose rows every analysis reads (a distributed trace holds every
        rank's; rank_peaks compares them). ValueError for a rank the trace lacks."""
        loaded = source if isinstance(source, trace_io.Trace) else trace_io.load(source)
        self.all_ranks = loaded
        self.trace = loaded.for_rank(rank)
        self.rank = loaded.check_rank(rank)
        self._memo: dict = {}  # navigation lists, computed once: the trace never changes
        self._by_rank: dict[int, TraceAnalysis] = {self.rank: self}  # shared by for_rank's

    def for_rank(self, rank) -> TraceAnalysis:
        """The analysis of `rank` over the same loaded trace (nothing is read again; each
        rank's analysis is made once and kept, with its own memo). ValueError (one line) for
        a value that is no whole number or a rank the trace lacks (Trace.check_rank): a
        value from outside may be passed as it came."""
        rank = self.all_ranks.check_rank(rank)
        if rank not in self._by_rank:
            other = TraceAnalysis(self.all_ranks, rank)
            other._by_rank = self._by_rank
            self._by_rank[rank] = other
        return self._by_rank[rank]

    @property
    def kernels(self) -> pd.DataFrame:
        """The ops table without projected communication rows (device "interconnect": FSDP2's
        collectives run on a stream of their own, so they are no kernel's idle time)."""
        ops = self.trace.ops
        return ops[ops["device"] != "interconnect"]

    @property
    def ranks(self) -> list[int]:
        """The ranks the trace holds ([0] for a single-process run)."""
        return self.all_ranks.ranks

    def rank_peaks(self, methods: list[str] | None = None) -> pd.DataFrame:
        """One row per (method, rank): status, peak_bytes and its breakdown, activation_bytes,
        reserved_bytes; the trace's bytes source (measured or simulated) for every rank."""
        methods = self.check_methods(methods)
        summary = self.all_ranks.summary
        columns = ["method", "rank", "status", "peak_bytes", "activation_bytes",
                   "reserved_bytes", *trace_io.PEAK_COLUMNS]
        rows = summary[summary["method"].isin(methods)][columns]
        return rows.sort_values(["method", "rank"], key=lambda c: c.map(
            {m: i for i, m in enumerate(methods)}) if c.name == "method" else c
        ).reset_index(drop=True)

    def _once(self, key: str, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def source(self) -> str:
        return self.trace.source

    @property
    def sources(self) -> dict:
        """Where times and bytes come from: {"time": measured|projected|None, "bytes": ...}."""
        return trace_io.sources(self.trace.run)

    @property
    def title(self) -> str:
        """One line naming the run: model, shape, dtype, device."""
        return trace_io.title(self.trace.run)

    def check_methods(self, methods: list[str] | None) -> list[str]:
        """The methods to analyse; ValueError naming the trace's methods for an unknown one."""
        known = self.trace.methods
        if not methods:
            return known
        missing = [m for m in methods if m not in known]
        if missing:
            raise ValueError(f"method(s) {', '.join(missing)} not in trace {self.trace.path} "
                             f"(it has {', '.join(known)})")
        return list(methods)

    def summary(self, baseline: str = "lora", methods: list[str] | None = None) -> pd.DataFrame:
        """Per method: step, forward and backward ms, ops per step, activation and peak MiB,
        trainable parameters, and each as a ratio to `baseline` (NaN if it is not in the trace)."""
        return overview.summary(self.trace.summary, baseline, self.check_methods(methods))

    def timing_spread(self, baseline: str = "lora",
                      methods: list[str] | None = None) -> pd.DataFrame:
        """Per method: median step ms with p25/p75, steps timed, the ratio to `baseline` with
        its 95% bootstrap interval and whether that contains 1, throughput (tokens/s, TFLOP/s,
        MFU) and the spread warning (overview.timing_spread)."""
        return overview.timing_spread(self.trace.summary, self.trace.steps,
                                      self.check_methods(methods), baseline)

    def adapter_overhead(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Sequential adapter overhead per method: adapter-branch ops, their busy time and the
        idle time before them, their share of the step, and the step against frozen and paca."""
        return analyses.adapter_overhead(self.trace.summary, self.kernels,
                                         self.check_methods(methods))

    def adapter_overhead_by_layer(self, methods: list[str] | None = None) -> pd.DataFrame:
        """The same per layer (decoder_layers)."""
        return analyses.adapter_overhead_by_layer(self.kernels, self.check_methods(methods),
                                                  self.decoder_layers())

    def activation_savings(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Activation bytes per base module: the frozen floor and what each method adds."""
        return analyses.activation_savings(self.trace.layers, self.check_methods(methods))

    def activation_totals(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Totals of activation_savings, with what paca saves against each method."""
        return analyses.activation_totals(self.activation_savings(methods))

    def peak_breakdown(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Memory alive at each method's peak, by category (long table)."""
        table = analyses.peak_breakdown(self.trace.summary, trace_io.MEMORY_CATEGORIES)
        return table[table["method"].isin(self.check_methods(methods))]

    def peak_breakdown_table(self, methods: list[str] | None = None) -> pd.DataFrame:
        """The same as one row per method with a `<category>_bytes` column per category, in
        the order figures stack them."""
        return analyses.peak_breakdown_wide(self.peak_breakdown(methods),
                                            trace_io.MEMORY_CATEGORIES)

    def memory_timeline(self, method: str, max_points: int | None = None) -> pd.DataFrame:
        """One method's memory over the step: t and bytes per category, plus total; with
        `max_points`, cut to about that many rows for plotting (the peak always kept)."""
        self.check_methods([method])
        timeline = analyses.memory_timeline(self.trace.memory, method,
                                            trace_io.MEMORY_CATEGORIES)
        return analyses.downsample_timeline(timeline, max_points) if max_points else timeline

    def memory_time_label(self) -> str:
        """What the memory timeline's t means in this trace."""
        return analyses.memory_time_label(self.sources)

    def activation_by_layer(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Activation bytes per layer (decoder_layers) and method: the frozen floor and what
        the method adds (the Activations view's bars)."""
        return analyses.activation_by_layer(self.activation_savings(methods),
                                            self.decoder_layers())

    def batch_shapes(self) -> pd.DataFrame | None:
        """The batch shapes a profiled loop's model saw, with their padding (profile()
        traces; None for others)."""
        if self.trace.batches is None:
            return None
        return analyses.batch_shapes(self.trace.batches)

    def layer_latency(self, methods: list[str] | None = None, phase: str | None = None,
                      kind: str | None = None, top_k: int | None = None) -> pd.DataFrame:
        """Per-module latency (forward and backward), slowest first; top_k per method."""
        return analyses.layer_latency(self.trace.layers, self.check_methods(methods), phase,
                                      kind, top_k)

    def decoder_layers(self) -> list[str]:
        """The model's layers (its repeated blocks) in order, for any module tree: decoder
        layers, or the items of its module lists; [] if the layers table has neither."""
        return list(self._once("layers", lambda: analyses.decoder_layers(self.trace.layers)))

    def drill_targets(self) -> list[str]:
        """Modules inside layers that have timed children (for drill-down)."""
        return list(self._once("drill", lambda: analyses.drill_targets(
            self.trace.layers, self.decoder_layers())))

    def drill_options(self, current: str | None) -> list[str]:
        """The short list the drill-down picker offers at `current` (None: the layers)."""
        return analyses.drill_options(self.drill_targets(), self.decoder_layers(), current)

    def latency_bars(self, methods: list[str] | None = None,
                     parent: str | None = None) -> pd.DataFrame:
        """The latency view's rows: forward and backward latency per layer, or per child of
        `parent` (a drill target; ValueError otherwise), very deep models grouped."""
        if parent is not None and parent not in self.drill_targets():
            raise ValueError(f"no module {str(parent)[:80]!r} to drill into in this trace")
        layers = self.trace.layers
        layers = layers[layers["method"].isin(self.check_methods(methods))]
        return analyses.latency_bars(layers, parent, self.decoder_layers())

    def layer_ops(self, method: str, layer: str, phase: str | None = None,
                  max_ops: int = 3000) -> pd.DataFrame:
        """The ops of one layer and method in one phase (or all), timed from the layer's first
        op, merged into at most about `max_ops` bars. ValueError for an unknown method,
        layer or phase."""
        self.check_methods([method])
        if layer not in self.decoder_layers():
            raise ValueError(f"no layer {str(layer)[:80]!r} in this trace")
        if phase is not None and phase not in trace_io.PHASES:
            raise ValueError(f"phase must be one of {', '.join(trace_io.PHASES)}")
        return analyses.layer_ops(self.trace.ops, method, layer, phase, max_ops)

    def gpu(self):
        """The GPU a projected or planned trace was made for (run.yaml gpu, a gpus.GpuSpec),
        or None. Older traces recorded fewer fields of a built-in GPU (its table entry is
        used then) or, for plans, its name in plan.gpu only. ValueError (one line) for a
        recorded spec that is neither a valid GpuSpec nor a built-in GPU's name."""
        from paca_prof.gpus import GPUS, GpuSpec

        run = self.trace.run
        recorded = run.get("gpu")
        if recorded:
            try:
                return GpuSpec.from_dict(recorded, "run.yaml gpu")
            except ValueError:
                if recorded.get("name") in GPUS:
                    return GPUS[recorded["name"]]
                raise
        named = (run.get("plan") or {}).get("gpu")
        return GPUS.get(named) if isinstance(named, str) else None

    def top_changes(self, other: TraceAnalysis, methods: list[str] | None = None,
                    n: int = 20) -> pd.DataFrame:
        """The `n` (method, module, phase) rows whose latency changed most, b - a in absolute
        terms, from this trace (a) to `other` (b): the one rule of "largest changes"."""
        diff = self.diff(other)
        if methods:
            diff = diff[diff["method"].isin(methods)]
        return analyses.top_changes(diff, n=n)

    def capacity_batches(self) -> list[int]:
        """The batch sizes the capacity sweep holds, smallest first ([] without a sweep)."""
        sweep = self.trace.capacity
        if sweep is None or sweep.empty:
            return []
        from paca_prof.analyze import capacity

        return capacity.batches(sweep)

    def capacity_curve(self, batch: int | None = None) -> tuple[pd.DataFrame, int] | None:
        """The capacity sweep at one batch (default: the run's batch if the sweep has it,
        else its smallest) and that batch; None if the trace has no sweep."""
        sweep = self.trace.capacity
        if sweep is None or sweep.empty:
            return None
        from paca_prof.analyze import capacity

        return capacity.select_batch(sweep, batch, preferred=self.trace.run.get("batch"))

    def capacity_answers(self, budget_bytes: float, batch: int | None = None,
                         methods: list[str] | None = None, baseline: str = "lora"):
        """The longest sequence per method under `budget_bytes`, read from the capacity sweep
        without simulating (capacity.max_seq_table), with the sweep at that batch: (table,
        curve, batch), or None without a sweep."""
        from paca_prof.analyze import capacity

        found = self.capacity_curve(batch)
        if found is None:
            return None
        curve, batch = found
        curve = curve[curve["method"].isin(self.check_methods(methods))]
        return capacity.max_seq_table(curve, budget_bytes, baseline), curve, batch

    def drill_up(self, module: str | None) -> str | None:
        """The parent to show after `module` when going one level up in the latency view."""
        return analyses.drill_up(module, self.decoder_layers())

    def diff(self, other: TraceAnalysis, level: str = "layers") -> pd.DataFrame:
        """This trace (a) against another (b), matched by method, module path and phase, and
        at level "ops" also by op name and occurrence."""
        if level == "ops":
            return analyses.diff_ops(self.trace.ops, other.trace.ops)
        return analyses.diff_layers(self.trace.layers, other.trace.layers)

    def headline(self) -> pd.DataFrame:
        """PaCA against LoRA in the paper's terms, beside the paper's figures. Total memory
        is reserved memory where measured on CUDA, the peak otherwise."""
        summary = self.trace.summary
        column = "reserved_bytes" if summary["reserved_bytes"].notna().any() else "peak_bytes"
        return analyses.headline(summary, column)

    def compare_activations(self, simulated: TraceAnalysis,
                            methods: list[str] | None = None) -> pd.DataFrame:
        """This measured trace against a simulation of the same configuration: activation
        bytes per method and module, largest disagreement first (analyze/compare.py).
        ValueError if the traces are not comparable or share none of `methods`."""
        return compare.activations(self.trace.layers, simulated.trace.layers,
                                   self.compared_methods(simulated, methods))

    def compare_peak(self, simulated: TraceAnalysis,
                     methods: list[str] | None = None) -> pd.DataFrame:
        """The same for the bytes of each memory category at the peak, and the peak."""
        return compare.peak(self.trace.summary, simulated.trace.summary,
                            self.compared_methods(simulated, methods))

    def compare_totals(self, simulated: TraceAnalysis,
                       methods: list[str] | None = None) -> pd.DataFrame:
        """The same for activation bytes, peak bytes, trainable parameters and ops per step."""
        return compare.totals(self.trace.summary, simulated.trace.summary,
                              self.compared_methods(simulated, methods))

    def compared_methods(self, simulated: TraceAnalysis,
                         methods: list[str] | None = None) -> list[str]:
        """The methods ok in both this measured trace and `simulated` (or `methods`, checked);
        ValueError if the traces are not comparable or share none."""
        compare.check_comparable(self.trace.run, simulated.trace.run)
        return compare.common_methods(self.trace.summary, simulated.trace.summary, methods)

    def projection_error(self, projected: TraceAnalysis) -> pd.DataFrame:
        """This measured trace against a projected trace of the same model, shape and dtype:
        measured and projected ms per method and phase, and the relative error.
        Raises ValueError if the sources or the configurations differ."""
        mine, theirs = self.trace.run, projected.trace.run
        if self.sources.get("time") != "measured" or projected.sources.get("time") != "projected":
            raise ValueError("projection_error compares a measured trace with a projected one")
        for key in ("seq", "batch", "dtype"):
            if mine[key] != theirs[key]:
                raise ValueError(f"traces differ in {key}: {mine[key]} vs {theirs[key]}")
        if mine["model"]["name"] != theirs["model"]["name"]:
            raise ValueError("traces are of different models")
        return analyses.projection_error(self.trace.summary, projected.trace.summary)
