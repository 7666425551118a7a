"""Benchmark: wall time of one training step per fine-tuning method, on the CPU.

One step = forward (with the LM loss), backward, AdamW step, zero_grad. `frozen` has nothing to
train, so its step is forward + backward only (the embeddings' output requires grad, as
paca_prof.methods.prepare sets it up): the floor every other method adds to.

Methods: frozen, full, lora, dora (PEFT), paca (this project's paca/), and `authors`: the PaCA
authors' published scheme, re-implemented in paca/authors.py (AuthorsPacaLinear), the same module
the profiler's method "paca-authors" uses.

Measurement: every prepared model is built once (deep copies of one randomly initialised base
model, so all methods start from the same weights), warmed up, then timed in ONE interleaved run:
each round visits every method once, in a freshly shuffled order; a visit runs `rewarm` untimed
steps and then times `reps` steps one by one with time.perf_counter (and time.process_time). The
garbage collector is frozen after setup and disabled inside timed regions. The statistic is the
median wall time per method; ratios are ratios of medians, with a 95% bootstrap interval over
whole rounds (bench/verdicts.py). As robustness checks the same ratios are also shown per round
(median over rounds of the within-round ratio), from the minima, and from the CPU-time medians:
on a busy machine, trust a result only where they agree.

Verdicts (config A's targets; config B reports only), by the rule of bench/verdicts.py: PASS when
the whole 95% interval is within the target, FAIL when all of it is beyond, INCONCLUSIVE
otherwise; no verdict under --quick or with fewer than verdicts.MIN_ROUNDS (9) rounds; a target
whose methods are not all in --methods is "not checked".

Run from the repository root:

    python bench/bench_step.py               # configs A and B (~5 min quiet, ~8 min under load)
    python bench/bench_step.py --config A    # only the small config, with its pass/fail targets
    python bench/bench_step.py --quick       # few rounds, a smoke run (no verdict)
    python bench/bench_step.py --threads 2   # torch.set_num_threads for the whole run (default 1)
    python bench/bench_step.py --adam fused  # AdamW implementation (default: torch's default)

Exit status: 1 when a target FAILED, 3 when none failed and one was INCONCLUSIVE, 0 otherwise
(also when nothing was judged: the last line says so); 2 for bad arguments.
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
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

import paca.layer  # noqa: E402
from paca import LLAMA_TARGETS  # noqa: E402
from paca.compiled import partial_connection_op  # noqa: E402
from paca_prof.methods import MethodSettings  # noqa: E402
from paca_prof.methods.registry import prepare  # noqa: E402
from paca_prof.recipe import Recipe  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

METHODS = ("frozen", "full", "lora", "dora", "paca", "authors")
# Not in the default run: paca with its Python autograd function instead of the compiled one
# that the CPU runs by default, to see in one interleaved run what the compiled one is worth.
OPTIONAL_METHODS = ("paca-python",)


# --------------------------------------------------------------------------------------------
# Configs and models.
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    name: str
    model: dict
    batch: int
    seq: int
    rank: int
    alpha: float
    rounds: int
    quick_rounds: int
    reps: int  # timed steps per visit
    rewarm: int  # untimed steps at the start of each visit
    warmup: int  # untimed steps per method before the timed rounds
    targets: dict = field(default_factory=dict)  # ratio name -> max allowed value
    note: str = ""
    footnote: str = ""


CONFIGS = {
    "A": BenchConfig(
        name="A",
        model=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
        ),
        batch=2,
        seq=128,
        rank=8,
        alpha=16.0,
        rounds=60,
        quick_rounds=6,
        reps=3,
        rewarm=0,
        warmup=5,
        targets={
            "paca/lora": 0.85,
            "(paca-frozen)/(lora-frozen)": 0.33,
            "paca/authors": 1.0,
        },
        note="small llama, fp32",
        footnote=(
            "frozen also computes the input gradient of layer 0's q/k/v and input norm (~70 MFLOP,"
            " ~1 ms at one thread), which the adapter methods skip; that makes paca-frozen and "
            "lora-frozen both ~1 ms smaller than against a matched floor."
        ),
    ),
    "B": BenchConfig(
        name="B",
        model=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=1,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=1024,
        ),
        batch=1,
        seq=512,
        rank=8,
        alpha=16.0,
        rounds=5,
        quick_rounds=1,
        reps=1,
        rewarm=0,
        warmup=1,
        note=(
            "one llama3-8b decoder layer; vocab 1024 (not 128256) so that the embedding and LM "
            "head stay negligible next to the layer"
        ),
        footnote=(
            "frozen is not a floor here: its embeddings' output requires grad, so its backward also "
            "computes the input gradient of q/k/v and of the input norm (about 26 GFLOP), which "
            "the adapter methods skip (nothing before their first adapter requires grad). With one "
            "layer that is ~6% of the step, more than LoRA's own extra, so "
            "(paca-frozen)/(lora-frozen) is ill-conditioned; read paca/lora and paca/authors."
        ),
    ),
}


def build_base(cfg: BenchConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**cfg.model, use_cache=False, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def prepare_method(base: nn.Module, method: str, settings: MethodSettings,
                   recipe: Recipe) -> nn.Module:
    model = copy.deepcopy(base)
    name = {"authors": "paca-authors", "paca-python": "paca"}.get(method, method)
    model = prepare(model, name, settings, recipe)
    model.train()
    return model


@dataclass
class Runner:
    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    input_ids: torch.Tensor

    def step(self) -> float:
        if self.method != "paca-python":
            return self.train_step()
        compiled = paca.layer.partial_connection_op
        paca.layer.partial_connection_op = lambda: None  # PacaLinear falls back to Python
        try:
            return self.train_step()
        finally:
            paca.layer.partial_connection_op = compiled

    def train_step(self) -> float:
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def make_runners(cfg: BenchConfig, methods: list[str], adam: str) -> dict[str, Runner]:
    base = build_base(cfg)
    settings = MethodSettings(r=cfg.rank, alpha=cfg.alpha)
    recipe = Recipe(targets=tuple(LLAMA_TARGETS))
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, cfg.model["vocab_size"], (cfg.batch, cfg.seq), generator=gen)
    runners = {}
    for method in methods:
        model = prepare_method(base, method, settings, recipe)
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {"fused": True} if adam == "fused" else {"foreach": {"default": None, "foreach": True}[adam]}
        optimizer = torch.optim.AdamW(params, lr=1e-5, **kwargs) if params else None
        runners[method] = Runner(method, model, optimizer, input_ids)
    del base
    gc.collect()
    return runners


# --------------------------------------------------------------------------------------------
# Measurement and report.
# --------------------------------------------------------------------------------------------


def run_config(cfg: BenchConfig, methods: list[str], rounds: int, adam: str, seed: int) -> dict:
    t0 = time.perf_counter()
    runners = make_runners(cfg, methods, adam)
    build_s = time.perf_counter() - t0

    info = {}
    for method, runner in runners.items():
        n_train = sum(p.numel() for p in runner.model.parameters() if p.requires_grad)
        n_tensors = sum(1 for p in runner.model.parameters() if p.requires_grad)
        first_loss = runner.step()  # the first step: loss of the untouched model
        info[method] = (n_train, n_tensors, first_loss)
        for _ in range(cfg.warmup - 1):
            runner.step()
    # Everything built so far is long-lived: keep it out of the collector's way, so that the
    # gc.collect() between visits is cheap and no collection lands inside a timed step.
    gc.collect()
    gc.freeze()

    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    per_round: list[dict[str, list[float]]] = []  # each round's wall times, per method
    rng = random.Random(seed)
    order = list(methods)
    t0 = time.perf_counter()
    for _ in range(rounds):
        rng.shuffle(order)
        this_round = {}
        for method in order:
            runner = runners[method]
            for _ in range(cfg.rewarm):
                runner.step()
            gc.collect()
            gc.disable()
            times = []
            try:
                for _ in range(cfg.reps):
                    c0 = time.process_time()
                    start = time.perf_counter()
                    runner.step()
                    times.append(time.perf_counter() - start)
                    cpu[method].append(time.process_time() - c0)
            finally:
                gc.enable()
            wall[method].extend(times)
            this_round[method] = times
        per_round.append(this_round)
    timed_s = time.perf_counter() - t0
    del runners
    gc.unfreeze()
    gc.collect()
    return dict(wall=wall, cpu=cpu, per_round=per_round, info=info, build_s=build_s, timed_s=timed_s)


# Each ratio: the methods it needs, and how it is computed from per-method times.
RATIOS = {
    "paca/lora": (("paca", "lora"), lambda t: t["paca"] / t["lora"]),
    "(paca-frozen)/(lora-frozen)": (
        ("paca", "lora", "frozen"),
        lambda t: (t["paca"] - t["frozen"]) / (t["lora"] - t["frozen"]),
    ),
    "paca/authors": (("paca", "authors"), lambda t: t["paca"] / t["authors"]),
    "paca/paca-python": (("paca", "paca-python"), lambda t: t["paca"] / t["paca-python"]),
}


def derived(t: dict[str, float]) -> dict[str, float]:
    """Every ratio whose methods all have a time in t."""
    return {name: ratio(t) for name, (needs, ratio) in RATIOS.items() if set(needs) <= t.keys()}


def ratios_of_medians(rounds: list[dict[str, list[float]]]) -> dict[str, float]:
    """The ratios of the per-method median wall times over the given rounds (the bootstrap's
    statistic: it receives whole rounds, so each round's methods stay paired)."""
    methods = rounds[0].keys()
    return derived({m: statistics.median(t for r in rounds for t in r[m]) for m in methods})


def report(
    cfg: BenchConfig, result: dict, rounds: int, threads: int, adam: str, quick: bool, seed: int
) -> dict[str, verdicts.Judgement]:
    """Print the config's table and ratios; return the judgement of each of its targets."""
    wall, cpu, info = result["wall"], result["cpu"], result["info"]
    med = {m: statistics.median(v) for m, v in wall.items()}
    mins = {m: min(v) for m, v in wall.items()}
    cpu_med = {m: statistics.median(v) for m, v in cpu.items()}
    m = cfg.model
    print()
    print(f"=== config {cfg.name}: {cfg.note}")
    print(
        f"    hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
        f"{m['num_hidden_layers']} layer(s), heads {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']} kv, vocab {m['vocab_size']}; batch {cfg.batch} x "
        f"{cfg.seq} tokens; rank {cfg.rank}, alpha {cfg.alpha:g}; targets q,k,v,o,gate,up,down; fp32"
    )
    print(
        f"    {threads} torch thread(s), AdamW {adam}; {rounds} rounds x {cfg.reps} timed "
        f"step(s) per method (+{cfg.rewarm} untimed per visit, {cfg.warmup} warmup); "
        f"build {result['build_s']:.1f}s, timed loop {result['timed_s']:.1f}s"
    )
    print()
    header = (
        f"    {'method':<11} {'median ms':>10} {'p25':>9} {'p75':>9} {'min':>9} {'cpu ms':>9} "
        f"{'x lora':>7} {'trainable':>11} {'tensors':>7} {'loss@0':>8}"
    )
    print(header)
    print("    " + "-" * (len(header) - 4))
    for method in wall:
        xs = [1e3 * x for x in wall[method]]
        ratio = med[method] / med["lora"] if "lora" in med else float("nan")
        n_train, n_tensors, loss0 = info[method]
        print(
            f"    {method:<11} {1e3 * med[method]:>10.2f} {verdicts.quantile(xs, .25):>9.2f} "
            f"{verdicts.quantile(xs, .75):>9.2f} {min(xs):>9.2f} {1e3 * cpu_med[method]:>9.2f} "
            f"{ratio:>7.3f} {n_train:>11,} {n_tensors:>7} {loss0:>8.4f}"
        )
    print(
        "    (median/p25/p75/min: wall clock per step; cpu: median process CPU time per step;"
        " x lora: ratio of wall medians)"
    )
    print()
    ratios = derived(med)
    intervals = verdicts.bootstrap_intervals(result["per_round"], ratios_of_medians, seed=seed)
    paired = [ratios_of_medians([r]) for r in result["per_round"]]
    from_min = derived(mins)
    from_cpu = derived(cpu_med)
    print(
        f"    {'ratio (wall medians)':<28}   {'value':>6}   {'95% interval':>14}   "
        f"{'per-round':>9} {'mins':>6} {'cpu':>6}"
    )
    judgements = {}
    for name, value in ratios.items():
        per_round_med = statistics.median(p[name] for p in paired)
        line = (
            f"    {name:<28} = {value:6.3f}   {intervals[name].format('5.3f')}   "
            f"{per_round_med:9.3f} {from_min[name]:6.3f} {from_cpu[name]:6.3f}"
        )
        if name in cfg.targets:
            limit = cfg.targets[name]
            judgement = verdicts.judge(
                intervals[name], limit, n=rounds, minimum=verdicts.MIN_ROUNDS, quick=quick
            )
            judgements[f"{cfg.name}: {name}"] = judgement
            line += f"   target <= {limit:g}: {judgement}"
        print(line)
    for name in cfg.targets:
        if name not in ratios:
            needs = ", ".join(RATIOS[name][0])
            judgement = verdicts.not_checked(f"needs {needs} in --methods")
            judgements[f"{cfg.name}: {name}"] = judgement
            print(f"    {name:<28}   target <= {cfg.targets[name]:g}: {judgement}")
    print(
        "    (value: the ratio of wall medians; 95% interval: bootstrap over whole rounds, so each"
        " round's methods stay paired; per-round: median over rounds of the ratio within each"
        " round; mins: the ratio of the per-method minima; cpu: of the CPU-time medians.)"
    )
    if cfg.targets:
        print("    " + verdicts.legend(verdicts.MIN_ROUNDS))
    elif rounds < verdicts.MIN_ROUNDS:
        print(f"    (intervals from {rounds} round(s), fewer than the {verdicts.MIN_ROUNDS} a verdict"
              " needs: not to be trusted)")
    if cfg.footnote:
        print("    note: " + cfg.footnote)
    return judgements


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["A", "B", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds of each config")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the whole run (default 1: on a small shared machine a "
        "second OpenMP thread turns every other process's time slice into a stall of both)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS + OPTIONAL_METHODS)}",
    )
    parser.add_argument(
        "--adam",
        choices=["default", "foreach", "fused"],
        default="default",
        help="AdamW implementation, the same for every method: torch's default (a per-tensor "
        "loop on the CPU), foreach=True, or fused=True",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders and bootstrap")
    args = parser.parse_args(argv)

    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS + OPTIONAL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS + OPTIONAL_METHODS}")
    if not methods:
        parser.error("--methods names no method")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    print(
        f"bench_step: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers_version()}, peft {peft_version()}; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s); load average at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    # Built (or loaded) here, before any timing; the first build takes about 30 s.
    compiled = partial_connection_op() is not None
    where = "compiled (paca/csrc)" if compiled else "in Python (PACA_COMPILED=0, or no build)"
    print(f"paca runs its autograd function {where}")

    names = ["A", "B"] if args.config == "both" else [args.config]
    judgements: dict[str, verdicts.Judgement] = {}
    for name in names:
        cfg = CONFIGS[name]
        rounds = args.rounds or (cfg.quick_rounds if args.quick else cfg.rounds)
        result = run_config(cfg, methods, rounds, args.adam, args.seed)
        judgements |= report(
            cfg, result, rounds, torch.get_num_threads(), args.adam, args.quick, args.seed
        )
        sys.stdout.flush()
    print()
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def peft_version() -> str:
    import peft

    return peft.__version__


if __name__ == "__main__":
    sys.exit(main())
