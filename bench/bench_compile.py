"""Benchmark: torch.compile against eager, one training step of paca and of lora, on the CPU.

One step = forward (with the LM loss), backward, AdamW step, zero_grad, as in bench_step.py.
Variants: paca-eager, paca-compiled (torch.compile(model, fullgraph=True): one graph, see
tests/test_paca_compiled.py), lora-eager, lora-compiled (torch.compile(model); PEFT's LoRA may
break the graph, and the number of graphs is printed). The default backend (inductor) compiles;
the compile time is the first steps' time, reported apart and never timed.

Measurement, as bench_step.py's: every variant is built from deep copies of one base model,
warmed up, then timed in ONE interleaved run: each round visits every variant once in a freshly
shuffled order and times `reps` steps with time.perf_counter. The garbage collector is frozen
after setup and disabled inside timed regions. The statistic is the median per variant; each
ratio is a ratio of medians with a 95% bootstrap interval over whole rounds (bench/verdicts.py).
All times are measured (host clock, CPU). It reports; it judges no target (exit status 0).

Run from the repository root:

    python bench/bench_compile.py             # ~4 min quiet: 2 compiles, then 30 rounds
    python bench/bench_compile.py --quick     # few rounds, a smoke run
    python bench/bench_compile.py --threads 2 # torch.set_num_threads (default 1)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import verdicts  # noqa: E402  (bench/verdicts.py)
from bench_step import CONFIGS, build_base  # noqa: E402
from paca import LLAMA_TARGETS  # noqa: E402
from paca.compiled import ensure_built  # noqa: E402
from paca_prof.methods import MethodSettings  # noqa: E402
from paca_prof.methods.registry import prepare  # noqa: E402
from paca_prof.recipe import Recipe  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

VARIANTS = ("paca-eager", "paca-compiled", "lora-eager", "lora-compiled")
RATIOS = {  # name -> (numerator, denominator)
    "paca compiled/eager": ("paca-compiled", "paca-eager"),
    "lora compiled/eager": ("lora-compiled", "lora-eager"),
    "paca/lora eager": ("paca-eager", "lora-eager"),
    "paca/lora compiled": ("paca-compiled", "lora-compiled"),
}


class Runner:
    """One variant's model, optimizer and step."""

    def __init__(self, base, variant: str, settings: MethodSettings, input_ids: torch.Tensor):
        method, _, mode = variant.partition("-")
        self.model = prepare(copy.deepcopy(base), method, settings,
                             Recipe(targets=tuple(LLAMA_TARGETS)))
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.forward = self.model
        if mode == "compiled":
            self.forward = torch.compile(self.model, fullgraph=(method == "paca"))
        self.input_ids = input_ids

    def step(self) -> float:
        loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def warm_up(runners: dict[str, Runner], steps: int) -> dict[str, dict]:
    """First steps of every variant (the compiles happen here); returns per variant the first
    step's seconds, the first loss and, for compiled variants, the number of graphs."""
    from torch._dynamo.utils import counters

    info = {}
    for variant, runner in runners.items():
        counters.clear()
        start = time.perf_counter()
        loss = runner.step()
        first = time.perf_counter() - start
        for _ in range(steps - 1):
            runner.step()
        graphs = counters["stats"]["unique_graphs"] if variant.endswith("compiled") else None
        info[variant] = {"first_s": first, "loss0": loss, "graphs": graphs}
    return info


def timed_rounds(runners: dict[str, Runner], rounds: int, reps: int, seed: int) -> list[dict]:
    """Interleaved rounds; returns each round's wall times per variant."""
    gc.collect()
    gc.freeze()
    per_round = []
    order = list(runners)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        this_round = {}
        for variant in order:
            gc.collect()
            gc.disable()
            try:
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    runners[variant].step()
                    times.append(time.perf_counter() - start)
            finally:
                gc.enable()
            this_round[variant] = times
        per_round.append(this_round)
    gc.unfreeze()
    return per_round


def ratios_of_medians(rounds: list[dict]) -> dict[str, float]:
    """Every ratio of RATIOS from the per-variant median over the given rounds."""
    med = {v: statistics.median(t for r in rounds for t in r[v]) for v in rounds[0]}
    return {name: med[num] / med[den] for name, (num, den) in RATIOS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per visit")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    args = parser.parse_args(argv)
    rounds = 4 if args.quick else args.rounds
    if rounds < 2 or args.reps < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--rounds >= 2, --reps >= 1, --warmup >= 1 and --threads >= 1")
    torch.set_num_threads(args.threads)

    cfg = CONFIGS["A"]
    print(f"bench_compile: python {platform.python_version()}, torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s); load average at "
          f"start {os.getloadavg()[0]:.2f}")
    print(f"paca's compiled PartialConnection: {ensure_built().action}")
    base = build_base(cfg)
    settings = MethodSettings(r=cfg.rank, alpha=cfg.alpha)
    input_ids = torch.randint(0, cfg.model["vocab_size"], (cfg.batch, cfg.seq),
                              generator=torch.Generator().manual_seed(1))
    runners = {v: Runner(base, v, settings, input_ids) for v in VARIANTS}
    del base
    info = warm_up(runners, args.warmup)
    per_round = timed_rounds(runners, rounds, args.reps, args.seed)
    wall = {v: [t for r in per_round for t in r[v]] for v in VARIANTS}

    m = cfg.model
    print(f"\nconfig A ({cfg.note}): hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
          f"batch {cfg.batch} x {cfg.seq} tokens, rank {cfg.rank}; {rounds} rounds x {args.reps} "
          f"timed steps per variant after {args.warmup} warm-up steps; inductor backend")
    print(f"\n    {'variant':<14} {'median ms':>10} {'p25':>9} {'p75':>9} {'first step s':>13} "
          f"{'graphs':>7} {'loss@0':>8}")
    for variant in VARIANTS:
        xs = [1e3 * t for t in wall[variant]]
        graphs = info[variant]["graphs"]
        p25, p75 = verdicts.quantile(xs, 0.25), verdicts.quantile(xs, 0.75)
        print(f"    {variant:<14} {statistics.median(xs):>10.2f} {p25:>9.2f} {p75:>9.2f} "
              f"{info[variant]['first_s']:>13.1f} "
              f"{'-' if graphs is None else graphs:>7} {info[variant]['loss0']:>8.4f}")
    print("    (measured: host wall clock per step; first step: includes the compile, or its load "
          "from torch's compile cache)\n")
    intervals = verdicts.bootstrap_intervals(per_round, ratios_of_medians, seed=args.seed)
    for name, value in ratios_of_medians(per_round).items():
        print(f"    {name:<22} = {value:6.3f}   95% interval {intervals[name].format()}")
    print("    (ratios of medians; interval: bootstrap over whole rounds)")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
