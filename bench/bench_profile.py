"""Benchmark: what paca_prof.profile() costs a training loop outside its active steps, on the CPU.

Three cases, each one training step of a llama-shaped model with PEFT LoRA (random weights,
built from a config; each case its own copy, the same seed), a plain loop's step: forward with
the LM loss, backward, AdamW.step(), zero_grad():

    plain   the step, no profiler anywhere
    warmup  the step and prof.step() inside a profile() block still in its warm-up steps
    after   the step and prof.step() inside a profile() block past its active steps (the trace
            already written)
    control a second plain copy: the spread between two copies of one model (their memory
            placement), the noise floor the two ratios above sit on; not a target

All are timed in ONE interleaved run: each round visits every case once, in a freshly shuffled
order, and times `reps` calls one by one with time.perf_counter; the garbage collector is frozen
after setup and disabled inside timed calls (a Capture session disables it during the active
steps only, so outside them the loop runs as it would without the profiler).

Per outside case: ratio = median case / median plain wall time, with a 95% bootstrap interval
over whole rounds (bench/verdicts.py: a round's cases stay paired), and as robustness checks the
median of the per-round ratios and the ratio of CPU-time medians. Target: ratio <= 1.05 (the
issue's "outside the active steps it costs at most 5%"). Verdict by bench/verdicts.py: PASS when
the whole interval is within the target, FAIL when all of it is beyond, INCONCLUSIVE otherwise;
no verdict under --quick or with fewer than 9 rounds.

Run from the repository root, with OMP_NUM_THREADS=1 on a shared machine:

    python bench/bench_profile.py                # 20 rounds x 3 calls per case
    python bench/bench_profile.py --quick        # 3 rounds x 1 call: a smoke run (no verdict)
    python bench/bench_profile.py --hidden 512 --layers 4 --seq 256

Exit status: 1 when a target FAILED, 3 when none failed and one was INCONCLUSIVE, 0 otherwise
(also when nothing was judged: the last line says so); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import verdicts  # noqa: E402  (bench/verdicts.py: this script's folder is on sys.path)

CASES = ("plain", "warmup", "after", "control")
OUTSIDE = ("warmup", "after", "control")
TARGET = 1.05
WARMUP = 3  # untimed calls of each case before the rounds (1 under --quick)


def lora_model(args):
    """The llama-shaped model with PEFT LoRA on every projection, and its AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128),
                         max_position_embeddings=max(args.seq, 64))
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def prepare_cases(args, workdir: Path):
    """The three cases (each a call that runs one step) and the profiles to close after."""
    import paca_prof

    ids = torch.randint(0, 1024, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))

    cases, profiles = {}, []
    cases["plain"] = _step_of(*lora_model(args), ids)
    # warm-up steps that never end: the block stays before its active steps
    model, optimizer = lora_model(args)
    warm = paca_prof.profile(model, optimizer, out=workdir / "warmup", warmup=10**6, active=2)
    warm.__enter__()
    profiles.append(warm)
    cases["warmup"] = _step_of(model, optimizer, ids, warm)
    model, optimizer = lora_model(args)
    after = paca_prof.profile(model, optimizer, out=workdir / "after", warmup=0, active=2)
    after.__enter__()
    profiles.append(after)
    cases["after"] = _step_of(model, optimizer, ids, after)
    cases["after"]()  # the active steps: timed, then profiled (the trace is written)
    cases["after"]()
    assert after.path is not None, "the active steps did not end"
    cases["control"] = _step_of(*lora_model(args), ids)
    return cases, profiles


def _step_of(model, optimizer, ids, prof=None):
    """One plain training step as a call; prof.step() after it inside a profile() block."""
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if prof is not None:
            prof.step()
    return step


def close(profiles) -> None:
    for prof in profiles:
        try:
            prof.__exit__(None, None, None)
        except RuntimeError:  # the warm-up block never reached its active steps, as meant
            pass


def measure(args, cases, warmup: int) -> tuple[list[dict], dict]:
    """The interleaved run: rounds of {case: [wall s per call]}, and CPU s per call per case."""
    for call in cases.values():
        for _ in range(warmup):
            call()
    gc.collect()
    gc.freeze()
    rng = random.Random(args.seed)
    order = list(cases)
    rounds: list[dict] = []
    cpu: dict = {case: [] for case in cases}
    for _ in range(args.rounds):
        rng.shuffle(order)
        this_round = {}
        for case in order:
            gc.collect()
            gc.disable()
            times = []
            try:
                for _ in range(args.reps):
                    c0 = time.process_time()
                    start = time.perf_counter()
                    cases[case]()
                    times.append(time.perf_counter() - start)
                    cpu[case].append(time.process_time() - c0)
            finally:
                gc.enable()
            this_round[case] = times
        rounds.append(this_round)
    gc.unfreeze()
    return rounds, cpu


def ratios(rounds: list[dict]) -> dict[str, float]:
    """Per outside case: median case / median plain wall time over the given rounds."""
    med = {case: statistics.median(t for r in rounds for t in r[case]) for case in CASES}
    return {case: med[case] / med["plain"] for case in OUTSIDE}


def report(args, rounds, cpu) -> dict[str, verdicts.Judgement]:
    point = ratios(rounds)
    intervals = verdicts.bootstrap_intervals(rounds, ratios, seed=args.seed)
    per_round = [ratios([r]) for r in rounds]
    plain_ms = 1e3 * statistics.median(t for r in rounds for t in r["plain"])
    cpu_plain = statistics.median(cpu["plain"])
    print()
    print(f"plain step: {plain_ms:.2f} ms (median wall time, measured)")
    print(f"{'case':<8} {'ms':>8} {'ratio':>7} {'95% interval':>16} {'per-round':>9} "
          f"{'cpu':>6}   target <= {TARGET:g}")
    judgements = {}
    for case in OUTSIDE:
        ms = 1e3 * statistics.median(t for r in rounds for t in r[case])
        judgement = (verdicts.not_checked("the A/A noise floor, not a target")
                     if case == "control" else
                     verdicts.judge(intervals[case], TARGET, n=len(rounds),
                                    minimum=verdicts.MIN_ROUNDS, quick=args.quick))
        if case != "control":
            judgements[case] = judgement
        print(f"{case:<8} {ms:>8.2f} {point[case]:>7.3f} {intervals[case].format('6.3f'):>16} "
              f"{statistics.median(p[case] for p in per_round):>9.3f} "
              f"{statistics.median(cpu[case]) / cpu_plain:>6.3f}   {judgement}")
    print("(measured: wall medians per call; ratio: case / plain; 95% interval: bootstrap over "
          "whole rounds; per-round: median of the within-round ratios; cpu: ratio of the "
          "CPU-time medians)")
    print(verdicts.legend(verdicts.MIN_ROUNDS))
    return judgements


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 1 call: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 20; 3 --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per case per round (default 3; 1 --quick)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (multiple of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders and bootstrap")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 20)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    for name in ("rounds", "reps", "layers", "seq", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.hidden < 128 or args.hidden % 128:
        parser.error(f"--hidden must be a positive multiple of 128, got {args.hidden}")

    warmup = 1 if args.quick else WARMUP
    torch.set_num_threads(args.threads)
    print(f"bench_profile: llama-shaped + PEFT LoRA r 8 on all projections, hidden "
          f"{args.hidden}, {args.layers} layers, {args.batch} x {args.seq} tokens, fp32, CPU, "
          f"{torch.get_num_threads()} torch thread(s); {args.rounds} rounds x {args.reps} "
          f"call(s) per case, {warmup} warm-up; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    workdir = Path(tempfile.mkdtemp(prefix="paca-prof-bench-profile-"))
    try:
        cases, profiles = prepare_cases(args, workdir)
        started = time.perf_counter()
        try:
            rounds, cpu = measure(args, cases, warmup)
        finally:
            close(profiles)
        print(f"timed in {time.perf_counter() - started:.0f} s; load average at end "
              f"{os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    judgements = report(args, rounds, cpu)
    print(verdicts.summary(judgements))
    return verdicts.exit_status(judgements.values())


if __name__ == "__main__":
    sys.exit(main())
