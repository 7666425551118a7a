"""The paca-prof command: argument parsing and printing only; the work happens in engines/,
analyze/ and plan. A user error is one line on stderr and exit status 2.

Nothing heavy is imported at the top: `--help`, `analyze` and `dash` never load torch; `run`
and `plan` import it when they start.
"""

from __future__ import annotations

import argparse
import gc
import os
import json
import logging
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from paca_prof import __version__
from paca_prof import methods as method_names
from paca_prof.gpus import GPUS
from paca_prof.presets import MODEL_PRESETS
from paca_prof.unused_imports import keep_out_bitsandbytes

_MODEL_HELP = (f"a preset ({', '.join(MODEL_PRESETS)}) or a local config.json / model "
               "folder").replace("%", "%%")

EXIT_USAGE = 2
ATTENTION_CHOICES = ("sdpa", "eager", "math", "flash", "efficient")


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _method_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        return method_names.check_methods(names)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _method_names(text: str) -> tuple[str, ...]:
    """Method names as a trace holds them (a profiled loop's may be custom, ia3, ...)."""
    from paca_prof import validate

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("no method named")
    for name in names:
        try:
            validate.text(name, "a method name", max_len=100)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def _add_peft_config(parser) -> None:
    parser.add_argument("--peft-config", type=Path, default=None, metavar="PATH",
                        help="a PEFT adapter_config.json (as save_pretrained writes it, or its "
                             "folder): lora, or dora with use_dora, trains exactly that adapter "
                             "(its r, alpha, dropout, targets, rank and alpha patterns); the "
                             "other methods keep the settings below")


def _peft_methods(args, default_methods) -> tuple[dict | None, tuple[str, ...]]:
    """The user's PEFT config (checked) and the methods: --methods, else the config's method,
    else `default_methods`. ValueError (one line) for a bad config."""
    if args.peft_config is None:
        return None, args.methods or default_methods
    from paca_prof.methods import peft_config as peft_configs

    peft_config = peft_configs.read(args.peft_config)
    return peft_config, args.methods or (peft_configs.method_of(peft_config),)


def _add_method_settings(parser: argparse.ArgumentParser) -> None:
    """The adapter methods' settings, the same in `run` and `plan`."""
    group = parser.add_argument_group("method settings (PEFT's meaning)")
    group.add_argument("--r", "--rank", dest="r", type=_positive_int, default=8,
                       help="LoRA/DoRA rank and PaCA's trained columns per linear (default 8)")
    group.add_argument("--alpha", type=_finite, default=16.0,
                       help="scaling = alpha / r for every adapter method (default 16)")
    group.add_argument("--dropout", type=_finite, default=0.0,
                       help="LoRA/DoRA dropout (default 0, PEFT's)")
    group.add_argument("--adapter-dtype", choices=method_names.ADAPTER_DTYPES, default="fp32",
                       help="LoRA/DoRA weights: fp32 (PEFT's autocast default) or the model's "
                            "dtype (default fp32)")
    group.add_argument("--seed", type=int, default=0,
                       help="seeds the weights, the batch and PaCA's column draw (default 0)")


def _target_list(text: str):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no target named")
    return "all-linear" if names == ["all-linear"] else tuple(names)


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags (recipe.py), the same in `run` and `plan`."""
    from paca_prof.recipe import (ALLOCATORS, DEFAULT_LOSS_CHUNKS, EXPERTS, LOSSES,
                                  OPTIMIZERS, QUANTIZE_SCOPES)

    group = parser.add_argument_group("recipe (how a step is trained, beside the method)")
    group.add_argument("--targets", type=_target_list, default=None,
                       help="comma-separated leaf names of the linears to adapt, or all-linear "
                            "(every linear but the head); default: q,k,v,o,gate,up,down_proj "
                            "where the model has them, else all-linear")
    group.add_argument("--experts", choices=EXPERTS, default="frozen",
                       help="mixture-of-experts models (experts stored as 3-D parameters): "
                            "frozen (default; PEFT's all-linear reaches only nn.Linear) or adapt "
                            "(lora/qlora: PEFT target_parameters; paca/qpaca: r input columns "
                            "per expert; dora keeps them frozen)")
    group.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                       help="sdpa (torch picks; measured default), eager or math (L x L "
                            "scores), flash / efficient (fused CUDA kernels; simulated default: "
                            "flash for bf16/fp16, efficient for fp32)")
    group.add_argument("--grad-ckpt", action="store_true",
                       help="gradient checkpointing of every decoder layer")
    group.add_argument("--loss", choices=LOSSES, default="hf",
                       help="hf (transformers' loss on the full logits; default), chunked "
                            "(torchtune's chunked cross-entropy), fused-linear (Liger's fused "
                            "linear cross-entropy: the full logits never exist)")
    group.add_argument("--loss-chunks", type=_positive_int, default=DEFAULT_LOSS_CHUNKS,
                       help=f"token chunks of chunked and fused-linear (default "
                            f"{DEFAULT_LOSS_CHUNKS})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                       help="adamw (torch; default), adamw-8bit and paged-adamw-8bit "
                            "(bitsandbytes), sgd, adafactor (torch)")
    group.add_argument("--grad-accum", type=_positive_int, default=1,
                       help="micro-batches per optimizer step (default 1)")
    group.add_argument("--max-grad-norm", type=_finite, default=None,
                       help="clip gradients to this total norm before each step (default: none)")
    group.add_argument("--amp", action="store_true",
                       help="fp32 parameters, autocast compute in --dtype (HF Trainer's bf16=True "
                            "on an fp32 model); default: parameters in --dtype")
    group.add_argument("--keep-outputs", action="store_true",
                       help="the loop holds the model's output (logits, KV cache) until the "
                            "next step's forward, as `outputs = model(**batch)` loops do; "
                            "default: dropped before backward, as HF Trainer does")
    group.add_argument("--quantize", choices=QUANTIZE_SCOPES, default=None,
                       help="qlora/qpaca: which linears are 4-bit: all-linear (default, as "
                            "load_in_4bit does) or targets")
    group.add_argument("--allocator", choices=ALLOCATORS, default="caching",
                       help="the CUDA caching allocator whose reserved memory is modelled: "
                            "caching (PyTorch's default) or expandable "
                            "(expandable_segments:True)")
    group.add_argument("--no-kbit-prep", dest="kbit_prep", action="store_false",
                       help="qlora/qpaca: skip PEFT's prepare_model_for_kbit_training casts "
                            "(fp32 embeddings, norms and head); its checkpointing is --grad-ckpt")


def _add_distributed(parser: argparse.ArgumentParser, measured: bool) -> None:
    """FSDP2's flags (distributed.py), the same in `run` and `plan`."""
    from paca_prof.distributed import BACKENDS, INTERCONNECTS

    group = parser.add_argument_group("distributed (FSDP2; every rank runs --batch sequences)")
    group.add_argument("--fsdp", action="store_true",
                       help="FSDP2 fully_shard per decoder layer and at the root"
                            + (": measured under torchrun --nproc-per-node N (gloo on cpu, "
                               "nccl on cuda), simulated per rank with --device meta"
                               if measured else ""))
    group.add_argument("--world-size", type=_positive_int, default=None,
                       help="ranks the model is sharded over"
                            + (" (simulated runs; a measured run takes torchrun's, and a value "
                               "given must match it)" if measured else " (default 1)"))
    group.add_argument("--no-reshard-after-forward", dest="reshard_after_forward",
                       action="store_false",
                       help="keep each layer's gathered parameters from forward to backward "
                            "(FSDP2's reshard_after_forward=False)")
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="simulated collectives: nccl (default; CUDA) or gloo (the CPU's: "
                            "scratch buffers, no forward prefetch), to compare with a measured "
                            "CPU run")
    group.add_argument("--interconnect", choices=tuple(INTERCONNECTS), default=None,
                       help="projected communication over this link: "
                            + "; ".join(f"{k}: {v['what']}" for k, v in INTERCONNECTS.items())
                            + " (default: the GPU's own, from the GPU table)")


def _distributed(args, device: str):
    """The Distributed of the flags (ValueError for a bad combination or launch)."""
    from paca_prof.distributed import for_run

    return for_run(device, args.fsdp, args.world_size, args.reshard_after_forward,
                   args.interconnect, args.backend)


def build_parser() -> argparse.ArgumentParser:
    from paca_prof.budget import DEFAULT_HEADROOM, HEADROOM_MEANING

    default_methods = ",".join(method_names.DEFAULT_METHODS)
    parser = _Parser(prog="paca-prof", description="Where a fine-tuning step's time and memory "
                     "go: PaCA against LoRA, DoRA and full fine-tuning, measured, simulated or "
                     "projected onto a GPU.")
    parser.add_argument("--version", action="version", version=f"paca-prof {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="measure (cpu, cuda) or simulate (meta) training steps of "
                                     "each method into a trace folder")
    run.add_argument("--model", required=True,
                     help=_MODEL_HELP)
    run.add_argument("--seq", type=_positive_int, required=True, help="tokens per sequence")
    run.add_argument("--batch", type=_positive_int, default=1, help="sequences (default 1)")
    run.add_argument("--methods", type=_method_list, default=None,
                     help=f"comma-separated, from {','.join(method_names.METHODS)} "
                          f"(default {default_methods}; with --peft-config, its method)")
    run.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="default: fp32 on cpu, bf16 on cuda and meta")
    run.add_argument("--device", choices=["cpu", "cuda", "meta"], default=None,
                     help="cpu or cuda measure real steps; meta simulates them (exact bytes) and "
                          "projects times onto --gpu. Default: cuda if present, else meta")
    run.add_argument("--gpu", default=None,
                     help=f"GPU to project simulated runs onto: {', '.join(GPUS)}, or a device "
                          "spec file (PATH.yaml, as paca-prof calibrate writes it); default "
                          "a100-80gb, the paper's. On a measured run: the peak that MFU is "
                          "taken against (CUDA: by default the GPU table's entry for the card)")
    run.add_argument("--headroom", default=DEFAULT_HEADROOM,
                     help=("simulated runs: a method whose reserved memory exceeds the GPU's "
                           "memory less its CUDA context and this is oom, as in the planner's "
                           f"budget (default {DEFAULT_HEADROOM}: what stays unmodelled)"
                           ).replace("%", "%%"))
    run.add_argument("--steps", type=_positive_int, default=10,
                     help="measured runs: timed rounds, one step of each method per round in "
                          "a shuffled order (default 10)")
    run.add_argument("--warmup", type=int, default=2,
                     help="warm-up steps, not measured: at least this many, then until the "
                          "step time settles (bounded; default 2; 0 for none)")
    run.add_argument("--threads", type=_positive_int, default=None,
                     help="measured runs: torch threads (default: torch's choice; recorded in "
                          "run.yaml)")
    run.add_argument("--time-budget", type=_finite, default=None, metavar="SECONDS",
                     help="measured runs: no timed round starts after this many seconds of "
                          "timing (one always runs; default: no bound)")
    run.add_argument("--out", type=Path, default=None,
                     help="trace folder to write (default traces/<model>-seq<N>-<device>-<time>)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_peft_config(run)
    _add_method_settings(run)
    _add_recipe(run)
    _add_distributed(run, measured=True)
    run.set_defaults(handler=_cmd_run)

    compare = sub.add_parser("compare", help="where a measured run and the simulation of the "
                                             "same configuration disagree, in bytes")
    compare.add_argument("measured", type=Path, help="a measured trace (run --device cpu|cuda, "
                                                     "or paca_prof.profile)")
    compare.add_argument("simulated", type=Path, help="a simulated trace of the same "
                                                      "configuration (run --device meta)")
    compare.add_argument("--methods", type=_method_names, default=None,
                         help="methods to compare (default: every method ok in both)")
    compare.add_argument("--top", type=_positive_int, default=10,
                         help="modules shown per method, largest disagreement first "
                              "(default 10)")
    compare.add_argument("--json", action="store_true", help="print the tables as JSON")
    compare.set_defaults(handler=_cmd_compare)

    analyze = sub.add_parser("analyze", help="analyse a trace folder (or compare two)")
    analyze.add_argument("trace", type=Path, help="trace folder written by paca-prof run")
    analyze.add_argument("--vs", type=Path, default=None, help="a second trace to compare with")
    analyze.add_argument("--methods", type=_method_names, default=None,
                         help="methods to show (default: all in the trace)")
    analyze.add_argument("--top", type=_positive_int, default=5,
                         help="slowest modules shown per method (default 5)")
    analyze.add_argument("--html", type=Path, default=None, help="write a self-contained report")
    analyze.add_argument("--force", action="store_true",
                         help="overwrite an existing report file (never inside a trace folder)")
    analyze.add_argument("--json", action="store_true", help="print the analyses as JSON")
    analyze.set_defaults(handler=_cmd_analyze)

    dash = sub.add_parser("dash", help="serve the interactive dashboard over a traces folder")
    dash.add_argument("traces", nargs="?", type=Path, default=Path("traces"),
                      help="folder of trace folders (default traces/)")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dash.add_argument("--port", type=_port, default=8050, help="port (default 8050)")
    dash.add_argument("--debug", action="store_true",
                      help="Dash debug mode (never for sharing; loopback only)")
    dash.set_defaults(handler=_cmd_dash)

    calibrate = sub.add_parser("calibrate", help="microbenchmark this device (GEMM, bandwidth, "
                                                 "per-op cost, optimizer step) and fit a device "
                                                 "spec for --gpu SPEC.yaml")
    calibrate.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                           help="the device to calibrate (default cpu)")
    calibrate.add_argument("--out", type=Path, default=None, metavar="SPEC.yaml",
                           help="write the fitted spec here (a new .yaml file); default: print "
                                "it only")
    calibrate.add_argument("--name", default=None,
                           help="the spec's name (default calibrated-<device>)")
    calibrate.add_argument("--threads", type=_positive_int, default=None,
                           help="torch threads while calibrating: use those of the runs it "
                                "will stand for (default: torch's choice)")
    calibrate.add_argument("--quick", action="store_true",
                           help="fewer sizes, fp32 and bf16 only: a smoke run")
    calibrate.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    calibrate.add_argument("--json", action="store_true",
                           help="print the measurements and the spec as JSON")
    calibrate.set_defaults(handler=_cmd_calibrate)

    from paca_prof.plan import DEFAULT_GRANULARITY, DEFAULT_TIME_BUDGET_S, PLAN_METHODS

    plan = sub.add_parser("plan", help="longest sequence (or largest batch) of each method that "
                                       "fits a GPU, from simulated steps")
    plan.add_argument("--model", required=True,
                      help=_MODEL_HELP)
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--gpu", help=f"plan for this GPU's memory: {', '.join(GPUS)}, or a "
                                      "device spec file (PATH.yaml)")
    target.add_argument("--memory", help="plan for this much memory instead: 24GiB, 80GB, 1.5TiB, "
                                         "bytes (K/M/G/T and KiB.. are binary, KB.. decimal)")
    plan.add_argument("--methods", type=_method_list, default=None,
                      help=f"comma-separated, from {','.join(method_names.METHODS)} "
                           f"(default {','.join(PLAN_METHODS)}; with --peft-config, its "
                           "method; frozen trains nothing)")
    plan.add_argument("--seq", type=_positive_int, default=None,
                      help="fix the sequence length and search the largest batch instead")
    plan.add_argument("--batch", type=_positive_int, default=None,
                      help="sequences per step while the length is searched (default 1)")
    plan.add_argument("--granularity", type=_positive_int, default=DEFAULT_GRANULARITY,
                      help=f"sequence lengths are searched on this grid of tokens "
                           f"(default {DEFAULT_GRANULARITY}); batches exactly")
    plan.add_argument("--headroom", default=DEFAULT_HEADROOM,
                      help=(f"kept back from the memory for what simulation does not count: "
                            f"sizes and percentages of the memory, summed (default "
                            f"{DEFAULT_HEADROOM}: {HEADROOM_MEANING}); 0 for none"
                            ).replace("%", "%%"))
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                      help="default bf16")
    plan.add_argument("--confirm", choices=["auto", "always", "never"], default="auto",
                      help="simulate each answer again at full depth: auto (while the plan stays "
                           "within --time-budget), always, never (default auto)")
    plan.add_argument("--time-budget", type=_finite, default=DEFAULT_TIME_BUDGET_S,
                      help="--confirm auto confirms while the whole command (imports included) "
                           f"stays within this many seconds (default {DEFAULT_TIME_BUDGET_S:g})")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    _add_peft_config(plan)
    plan.add_argument("--out", type=Path, default=None,
                      help="also write the plan as a trace folder (capacity sweep) for analyze/dash")
    _add_method_settings(plan)
    _add_recipe(plan)
    _add_distributed(plan, measured=False)
    plan.set_defaults(handler=_cmd_plan)
    return parser


def _settings(args):
    from paca_prof.methods import MethodSettings

    return MethodSettings(r=args.r, alpha=args.alpha, dropout=args.dropout,
                          adapter_dtype=args.adapter_dtype, seed=args.seed)


def _recipe(args, methods, dtype):
    """The recipe from the flags; ValueError for flags that contradict the methods or dtype."""
    from paca_prof.methods import QUANTIZED
    from paca_prof.recipe import Recipe

    if args.quantize is not None and not set(QUANTIZED) & set(methods):
        raise ValueError(f"--quantize sets how {' and '.join(QUANTIZED)} store their bases; "
                         "none of them is in --methods")
    if args.amp and dtype == "fp32":
        raise ValueError("--amp computes in --dtype under autocast: give bf16 or fp16")
    return Recipe(targets=args.targets, attention=args.attention, grad_ckpt=args.grad_ckpt,
                  loss=args.loss, loss_chunks=args.loss_chunks, optimizer=args.optimizer,
                  grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, amp=args.amp,
                  quantize=args.quantize or "all-linear", kbit_prep=args.kbit_prep,
                  allocator=args.allocator, experts=args.experts,
                  keep_outputs=args.keep_outputs)


def _cmd_run(args) -> int:
    with _setting_up(args.own_process):
        import torch

        from paca_prof.analyze import TraceAnalysis
        from paca_prof.budget import make_budget
        from paca_prof.gpus import gpu_spec
        from paca_prof.spec import RunSpec

        device = args.device or ("cuda" if torch.cuda.is_available() else "meta")
        dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
        if args.time_budget is not None and not args.time_budget > 0:
            raise UsageError(f"--time-budget must be above 0 seconds, got "
                             f"{args.time_budget:g}")
        if args.threads is not None and args.threads > 4096:
            raise UsageError(f"--threads must be at most 4096, got {args.threads}")
        try:
            gpu = gpu_spec(args.gpu or "a100-80gb")
            budget = make_budget(gpu=gpu, headroom=args.headroom)
            peft_config, methods = _peft_methods(args, method_names.DEFAULT_METHODS)
            spec = RunSpec(model=args.model, seq=args.seq, batch=args.batch, dtype=dtype,
                           device=device, methods=methods, settings=_settings(args),
                           recipe=_recipe(args, methods, dtype), steps=args.steps,
                           warmup=args.warmup, seed=args.seed, peft_config=peft_config,
                           distributed=_distributed(args, device),
                           threads=args.threads, time_budget_s=args.time_budget)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.own_process:
            keep_out_bitsandbytes(spec.methods, spec.recipe.optimizer)
            from paca_prof.methods.registry import import_libraries

            import_libraries(spec.methods)  # within the set-up: frozen with it
        from paca_prof import engines

    out = args.out or engines.default_out(spec)
    command = "paca-prof " + shlex.join(sys.argv[1:])
    bar, progress = _progress_bar("paca-prof run", len(spec.methods), finished="done")
    try:
        path = engines.run(spec, out, command, progress, gpu=gpu, budget=budget,
                           peak=gpu if args.gpu is not None and device != "meta" else None)
    except ValueError as error:
        raise UsageError(str(error)) from None
    finally:
        bar.close()
    if path is None:  # a distributed run's other ranks: rank 0 writes and prints
        return 0
    analysis = TraceAnalysis(path)
    if args.json:
        rows = analysis.trace.summary.set_index("method")
        methods = {m: _jsonable(row) for m, row in rows.iterrows()}
        payload = {"trace": str(path), "methods": methods}
        if len(analysis.ranks) > 1:
            payload["ranks"] = _records(analysis.rank_peaks())
        print(json.dumps(payload, indent=2))
    else:
        _print_summary(analysis)
        if device == "meta":  # which limit decided ok and oom: the planner's budget
            print(f"ok/oom: simulated reserved memory against {budget.describe(meaning=False)}"
                  " (paca-prof plan's budget)")
        if len(analysis.ranks) > 1:
            print(f"\nper-rank memory (MiB, {analysis.sources.get('bytes')}); the table above "
                  f"is rank {analysis.rank}'s")
            print(_bytes_as_mib(analysis.rank_peaks()[["method", "rank", "status", "peak_bytes",
                                                      "activation_bytes", "reserved_bytes"]])
                  .to_string(index=False, float_format=lambda v: f"{v:,.3f}", na_rep="-"))
        print(f"trace: {path}")
    failed = analysis.trace.summary["status"].eq("error").any()
    return 1 if failed else 0


def _cmd_analyze(args) -> int:
    from paca_prof.analyze import TraceAnalysis
    from paca_prof.analyze.report import check_report_path, write_html

    try:
        if args.html is not None:
            check_report_path(args.html, args.force)
        analysis = TraceAnalysis(args.trace)
        methods = analysis.check_methods(list(args.methods) if args.methods else None)
        other = TraceAnalysis(args.vs) if args.vs else None
    except ValueError as error:
        raise UsageError(str(error)) from None
    tables = {
        "adapter_overhead": analysis.adapter_overhead(methods),
        "activation_totals": analysis.activation_totals(methods),
        "peak_breakdown": analysis.peak_breakdown(methods),
        "top_layers": analysis.layer_latency(methods, top_k=args.top),
        "headline": analysis.headline(),
    }
    if other is not None:
        tables["diff"] = analysis.top_changes(other, methods=methods)
    batches = analysis.batch_shapes()
    if batches is not None:
        tables["batches"] = batches
    if args.html:
        try:
            write_html(analysis, args.html, methods)
        except OSError as error:
            raise UsageError(f"cannot write {args.html}: {error.strerror}") from None
    if args.json:
        payload = {"trace": str(analysis.trace.path), "sources": analysis.sources,
                   "summary": _records(analysis.summary(methods=methods)),
                   "timing_spread": _records(analysis.timing_spread(methods=methods))}
        payload.update({name: _records(table) for name, table in tables.items()})
        print(json.dumps(payload, indent=2))
        return 0
    _print_summary(analysis, methods)
    sources = analysis.sources
    titles = {
        "adapter_overhead": "sequential adapter overhead (adapter-branch ops and the idle time "
                            f"before them; times {sources.get('time')})",
        "activation_totals": f"activation bytes ({sources.get('bytes')}): frozen floor "
                             "and what each method adds",
        "peak_breakdown": f"memory at the peak, MiB ({sources.get('bytes')})",
        "top_layers": f"slowest modules per method (ms, {sources.get('time')})",
        "headline": "paca against lora, in the paper's terms",
        "diff": f"largest latency changes, {args.trace} (a) vs {args.vs} (b)",
        "batches": "batches the model saw in the active steps (measured; padding from "
                   f"{(analysis.trace.run.get('batches') or {}).get('padding_from', '?')})",
    }
    tables["peak_breakdown"] = analysis.peak_breakdown_table(methods)
    for name, table in tables.items():
        table = _bytes_as_mib(table)
        print(f"\n{titles[name]}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:,.3f}", na_rep="-"))
    if args.html:
        print(f"\nreport: {args.html}")
    return 0


def _cmd_compare(args) -> int:
    from paca_prof.analyze import TraceAnalysis

    try:
        measured, simulated = TraceAnalysis(args.measured), TraceAnalysis(args.simulated)
        methods = list(args.methods) if args.methods else None
        tables = {"totals": measured.compare_totals(simulated, methods),
                  "peak": measured.compare_peak(simulated, methods),
                  "activations": measured.compare_activations(simulated, methods)}
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        payload = {"measured": str(args.measured), "simulated": str(args.simulated)}
        payload.update({name: _records(table) for name, table in tables.items()})
        print(json.dumps(payload, indent=2))
        return 0
    activations = tables["activations"]
    print(f"measured: {measured.title} ({args.measured})")
    print(f"simulated: {simulated.title} ({args.simulated})")
    print("simulated - measured; bytes in MiB, measured on one side and simulated on the other")
    print("\ntotals")
    print(tables["totals"].to_string(index=False, na_rep="-", float_format=lambda v: (
        f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3f}")))
    print("\nmemory at the peak, by category (MiB)")
    print(_bytes_as_mib(tables["peak"]).to_string(index=False, float_format=lambda v: f"{v:,.3f}",
                                                  na_rep="-"))
    for method, rows in activations.groupby("method", sort=False):
        agree = int((rows["diff_bytes"] == 0).sum())
        shown = rows[rows["diff_bytes"].fillna(1) != 0].head(args.top)
        print(f"\nactivation bytes per module, {method}: {agree} of {len(rows)} modules agree "
              "exactly" + ("; largest disagreements (MiB):" if len(shown) else ""))
        if len(shown):
            print(_bytes_as_mib(shown.drop(columns="method")).to_string(
                index=False, float_format=lambda v: f"{v:,.4f}", na_rep="-"))
    return 0


def _check_spec_out(path: Path, force: bool) -> None:
    """UsageError unless `path` can take a new spec file: .yaml or .yml, in an existing,
    writable folder, not an existing file (without --force) and never a folder."""
    if path.suffix not in (".yaml", ".yml"):
        raise UsageError(f"--out {path}: a device spec is a .yaml file")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder")
    if path.exists() and not force:
        raise UsageError(f"--out {path} exists; give --force to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"--out {path}: no folder {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--out {path}: folder {path.parent} is not writable")


def _cmd_calibrate(args) -> int:
    from paca_prof import validate

    if args.out is not None:
        _check_spec_out(args.out, args.force)
    if args.threads is not None and args.threads > 4096:
        raise UsageError(f"--threads must be at most 4096, got {args.threads}")
    try:
        if args.name is not None:
            validate.text(args.name, "--name", 64)
    except ValueError as error:
        raise UsageError(str(error)) from None
    import torch

    from paca_prof.calibrate import calibrate
    from paca_prof.gpus import write_spec

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = calibrate(args.device, name=args.name, quick=args.quick,
                           progress=lambda what: print(f"paca-prof calibrate: {what}",
                                                       file=sys.stderr, flush=True))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.out is not None:
        write_spec(result.spec, args.out)
    if args.json:
        print(json.dumps({"spec": result.spec.to_dict(), "gemm": result.gemm,
                          "bandwidth": result.bandwidth, "mixed_layout": result.mixed_layout,
                          "dispatch_us": result.dispatch_us,
                          "tiny_op_us": result.tiny_op_us, "overhead": result.overhead,
                          "attention": result.attention, "optimizer": result.optimizer,
                          "bare_us": result.bare_us, "seconds": result.seconds,
                          "out": str(args.out) if args.out else None}, indent=2))
        return 0
    spec = result.spec
    print(f"paca-prof calibrate: {args.device}, {torch.get_num_threads()} torch thread(s), "
          f"{result.seconds:.0f} s; every number below is measured on this machine now")
    for dtype in ("fp32", "bf16", "fp16"):
        rows = [r for r in result.gemm if r["dtype"] == dtype]
        if rows:
            cells = ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['tflops'] * 1e3:.1f}"
                              for r in rows)
            print(f"  GEMM {dtype} (measured GFLOP/s, the bare call's "
                  f"{result.bare_us['mm']:.1f} us taken off): {cells}")
    print(f"  bandwidth by bytes an op moves (measured GB/s, the bare add's "
          f"{result.bare_us['add']:.1f} us taken off): {_curve_cells(spec.bandwidth_curve)}")
    print(f"  the same, an operand read transposed (measured GB/s): "
          f"{_curve_cells(spec.mixed_layout_bandwidth_curve)}")
    steps = ", ".join(f"{r['method']} {r['phase']} {r['measured_us'] / 1e3:.2f} ms "
                      f"({r['ops']} ops, {r['entries']:.0f} module entries)"
                      for r in result.overhead["steps"])
    print(f"  small llama steps (measured): {steps}")
    print(f"  fitted on them: {result.dispatch_us:.1f} us per op, "
          f"{result.overhead['forward_op_us']:.1f} us more per forward op, "
          f"{result.overhead['module_call_us']:.1f} us per module entered; a tiny op with "
          f"autograd alone: {result.tiny_op_us:.1f} us (measured)")
    print(f"  attention (SDPA {result.attention['shape']}, measured): "
          f"{result.attention['tflops'] * 1e3:.1f} GFLOP/s")
    for name in ("lora-like", "full-like"):
        row = result.optimizer[name]
        print(f"  AdamW step, {name} ({row['tensors']} tensors, measured): "
              f"{row['measured_us'] / 1e3:.2f} ms")
    print(f"fitted spec {spec.name}: fp32 {spec.fp32_tflops * 1e3:.1f} / bf16 "
          f"{spec.bf16_tflops * 1e3:.1f} GFLOP/s peak, matmul efficiency "
          f"{spec.matmul_efficiency:.2f} (median; by size in matmul_curve, "
          f"{len(spec.matmul_curve)} points), attention efficiency "
          f"{spec.attention_efficiency:.2f}, {spec.hbm_gbps:.2f} GB/s (the largest size's; by "
          f"size in bandwidth_curve, {len(spec.bandwidth_curve)} points), launch "
          f"{spec.launch_us:.1f} us, dispatch "
          f"{spec.dispatch_us:.1f} us, forward op {spec.forward_op_us:.1f} us more, module "
          f"call {spec.module_call_us:.1f} us, foreach "
          f"{spec.foreach_tensor_us:.2f} us per tensor")
    if args.out is not None:
        print(f"spec: {args.out}  (paca-prof run --device meta --gpu {args.out} ... projects "
              "onto it)")
    return 0


def _curve_cells(curve) -> str:
    """A bandwidth curve as "0.19 MiB 11.0, ..." (bytes an op moves, GB/s)."""
    return ", ".join(f"{size / 2**20:.2g} MiB {gbps:.1f}" for size, gbps in curve)


def _cmd_dash(args) -> int:
    if not args.traces.is_dir():
        raise UsageError(f"{args.traces}: no such traces folder")
    from dashboards.app import serve  # its one rule for debug mode: loopback addresses only

    try:
        serve(args.traces, host=args.host, port=args.port, debug=args.debug)
    except ValueError as error:
        raise UsageError(str(error).replace("debug mode", "--debug", 1)) from None
    return 0


def _cmd_plan(args) -> int:
    from paca_prof import plan as planner
    from paca_prof.budget import make_budget

    if args.seq is not None and args.batch is not None:
        raise UsageError("--seq searches the batch: leave out --batch")
    if not args.time_budget >= 0:
        raise UsageError(f"--time-budget must be 0 or more, got {args.time_budget:g}")
    with _setting_up(args.own_process):
        try:
            budget = make_budget(gpu=args.gpu, memory=args.memory, headroom=args.headroom)
            peft_config, methods = _peft_methods(args, planner.PLAN_METHODS)
            spec = planner.make_spec(args.model, methods, seq=args.seq,
                                     batch=args.batch or 1, dtype=args.dtype,
                                     recipe=_recipe(args, methods, args.dtype),
                                     settings=_settings(args), peft_config=peft_config,
                                     distributed=_distributed(args, "meta"))
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.own_process:
            keep_out_bitsandbytes(spec.methods, spec.recipe.optimizer)
            from paca_prof.methods.registry import import_libraries

            import_libraries(spec.methods)  # within the set-up: frozen with it
    bar, progress = _progress_bar("paca-prof plan", len(spec.methods), finished="searched")
    try:
        result = planner.plan(spec, budget, seq=args.seq, granularity=args.granularity,
                              confirm=args.confirm,
                              time_budget_s=args.time_budget - _seconds_since_start(),
                              progress=progress)
    finally:
        bar.close()
    path = None
    if args.out is not None:
        command = "paca-prof " + shlex.join(sys.argv[1:])
        try:
            path = planner.write_trace(result, spec, args.out, command)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps({**result.to_dict(), "trace": str(path) if path else None}, indent=2))
    else:
        _print_plan(result)
        if path:
            print(f"trace: {path}")
    return 0


def _progress_bar(desc: str, methods: int, finished: str):
    """A progress bar on stderr (one step per method) and the (method, state) callback the
    engines and the planner report to; `finished` is the state that completes a method."""
    from tqdm import tqdm

    bar = tqdm(total=methods, desc=desc, unit="method", file=sys.stderr, disable=None)

    def progress(method: str, state: str) -> None:
        bar.set_postfix_str(f"{method}: {state}")
        if state == finished:
            bar.update()

    return bar, progress


def _seconds_since_start() -> float:
    """Wall seconds since this process started (from Linux's /proc); 0 where unknown."""
    import os

    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _print_plan(result) -> None:
    """Per method: the answer, then a table of the curve (simulated bytes by category)."""
    from paca_prof.trace import MEMORY_CATEGORIES
    from paca_prof.units import GIB, format_bytes

    budget = result.budget.budget_bytes
    unit = "tokens" if result.vary == "seq" else "sequences"
    fixed = (f"batch {result.batch}" if result.vary == "seq"
             else f"seq {result.seq}, batch searched")
    checkpointing = ("gradient checkpointing" if result.recipe.grad_ckpt
                     else "no gradient checkpointing")
    ranks = (f", FSDP2 over {result.distributed['world_size']} ranks (every byte per rank, "
             f"batch per rank)" if result.distributed else "")
    print(f"paca-prof plan: {result.model} ({result.n_layers} layers), {fixed}, {result.dtype}, "
          f"{result.recipe.attention} attention, {checkpointing}{ranks}")
    print(result.budget.describe())
    if len(result.depths) == 1:
        how = f"the {result.n_layers}-layer model simulated at each size"
    else:
        how = (f"{result.depths[0]}- and {result.depths[1]}-layer models simulated, "
               f"extrapolated to {result.n_layers} layers")
    print(f"every byte below is simulated (meta device: exact tensor bytes; reserved: the "
          f"allocator model's, which must fit the budget); {how}; {result.vary} searched to "
          f"{result.granularity} {unit}; {result.elapsed_s:.1f} s")
    for name, mp in result.methods.items():
        print()
        if mp.at_limit:
            head = (f"fits even at the search limit, {result.vary} {mp.max_size} "
                    f"(simulated reserved {format_bytes(mp.best.reserved_bytes)}); longer may "
                    f"fit")
        elif mp.fits:
            what = "longest sequence" if result.vary == "seq" else "largest batch"
            head = (f"{what} that fits: {mp.max_size} {unit} "
                    f"({getattr(mp.next, result.vary)} does not); simulated reserved "
                    f"{format_bytes(mp.best.reserved_bytes)} = "
                    f"{100 * mp.best.reserved_bytes / budget:.1f}% of the "
                    f"{format_bytes(budget)} budget (peak allocated "
                    f"{format_bytes(mp.best.peak_bytes)})")
        else:
            head = (f"NOTHING FITS: max {result.vary} 0; even {result.vary} "
                    f"{getattr(mp.smallest, result.vary)} reserves "
                    f"{format_bytes(mp.smallest.reserved_bytes)} (simulated), over the "
                    f"{format_bytes(budget)} budget")
        print(f"{name}: {head}")
        print(f"  {mp.confirmation}")
        categories = list(MEMORY_CATEGORIES)
        header = (f"  {result.vary:>8} {'reserved GiB':>12} {'% budget':>8} {'peak GiB':>9} "
                  + " ".join(f"{c:>11}" for c in categories) + "  source")
        print(header)
        for _, row in result.curve_table(name).iterrows():
            size, peak, held = (int(row[result.vary]), int(row["peak_bytes"]),
                                int(row["reserved_bytes"]))
            mark = "  <- max" if row["is_max"] else ("  over budget" if row["over_budget"]
                                                     else "")
            cells = " ".join(f"{int(row[c]) / GIB:>11.2f}" for c in categories)
            print(f"  {size:>8} {held / GIB:>12.2f} {100 * held / budget:>8.1f} "
                  f"{peak / GIB:>9.2f} {cells}  {'probed' if row['probed'] else 'fitted'}{mark}")


def _bytes_as_mib(frame):
    """For printing: byte columns in MiB, renamed so."""
    from paca_prof.units import MIB

    frame = frame.copy()
    for column in [c for c in frame.columns if c == "bytes" or c.endswith("_bytes")]:
        frame[column] = frame[column].astype(float) / MIB
        frame = frame.rename(columns={column: column.removesuffix("bytes") + "MiB"})
    return frame


def _records(frame) -> list[dict]:
    return [_jsonable(row) for _, row in frame.iterrows()]


def _print_summary(analysis, methods: list[str] | None = None) -> None:
    from paca_prof import trace

    baseline = "lora"
    table = analysis.summary(baseline=baseline, methods=methods)
    run = analysis.trace.run
    sources = analysis.sources
    has_baseline = baseline in set(table["method"]) and \
        table.set_index("method").loc[baseline, "peak_mib"] == \
        table.set_index("method").loc[baseline, "peak_mib"]  # not NaN: it has numbers
    ratios = f"; ratios are to {baseline}" if has_baseline else "; no lora run, so no ratios"
    print(f"{trace.title(run)}: times {sources.get('time') or 'not available'}, "
          f"bytes {sources.get('bytes')}, reserved {sources.get('reserved') or 'not available'}"
          f"{ratios}")
    columns = [("step_ms", "step ms", "{:.1f}"), ("forward_ms", "fwd ms", "{:.1f}"),
               ("backward_ms", "bwd ms", "{:.1f}"), ("ops_per_step", "ops/step", "{:.0f}"),
               ("activation_mib", "act MiB", "{:.1f}"), ("peak_mib", "peak MiB", "{:.1f}"),
               ("reserved_mib", "reserved MiB", "{:.1f}"),
               ("trainable_params", "trainable", "{:,.0f}")]
    header = f"{'method':<8} {'status':<6} " + " ".join(f"{label:>16}" for _, label, _ in columns)
    print(header)
    for _, row in table.iterrows():
        cells = []
        for name, _, fmt in columns:
            value, ratio = row[name], row[f"{name}_vs_{baseline}"]
            text = "-" if value != value else fmt.format(value)
            text += "" if ratio != ratio else f" ({ratio:.2f}x)"
            cells.append(f"{text:>16}")
        print(f"{row['method']:<8} {row['status']:<6} " + " ".join(cells))
    _print_spread(analysis, methods, baseline)
    _print_stale(analysis, methods)


def _print_stale(analysis, methods: list[str] | None) -> None:
    """One line per method whose columns can be stale (paca-authors): how many of the steps
    its measured run ran (warm-up, timed and profiled) ran on stale columns."""
    import pandas as pd

    summary = analysis.trace.summary
    if "stale_steps" not in summary:
        return
    for _, row in summary.iterrows():
        if methods is not None and row["method"] not in methods:
            continue
        stale, run = row["stale_steps"], row.get("steps_run")
        if pd.isna(stale):
            continue
        print(f"{row['method']}: {int(stale)} of {int(run)} steps run (warm-up, timed and "
              "profiled; measured) ran on stale columns (W[:, idx] one optimizer step old)")


def _print_spread(analysis, methods: list[str] | None, baseline: str) -> None:
    """The spread of the step times (measured runs) and the throughput (measured or
    projected), then one warning line per method whose numbers cannot be trusted."""
    import pandas as pd

    time_source = analysis.sources.get("time")
    if time_source is None:
        return
    table = analysis.timing_spread(baseline, methods)
    table = table[table["step_ms"].notna()]
    if table.empty:
        return
    measured = table["step_ms_p25"].notna().any()
    peak = (analysis.trace.run.get("timing") or {}).get("peak_for_mfu") if measured else \
        (analysis.trace.run.get("gpu") or {}).get("name")
    if measured:
        print(f"\nspread ({time_source}): median step ms [p25-p75] over the timed steps of "
              f"interleaved rounds; ratio to {baseline} with its 95% bootstrap interval over "
              f"rounds; throughput {time_source}, MFU against {peak or 'no known peak'}")
    else:
        print(f"\nthroughput ({time_source}): "
              + (f"MFU against {peak}'s peak" if peak else "no MFU (no known peak)"))
    if measured:
        print(f"{'method':<8} {'step ms [p25-p75]':>24} {'steps':>6} {'ratio [95% CI]':>22} "
              f"{'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7}")
    else:
        print(f"{'method':<8} {'step ms':>10} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7}")
    for _, row in table.iterrows():
        mfu = "-" if row["mfu"] != row["mfu"] else f"{100 * row['mfu']:.1f}%"
        tflops = "-" if row["achieved_tflops"] != row["achieved_tflops"] else \
            f"{row['achieved_tflops']:.3g}"
        tokens = "-" if row["tokens_per_s"] != row["tokens_per_s"] else \
            f"{row['tokens_per_s']:,.0f}"
        rate = f"{tokens:>10} {tflops:>9} {mfu:>7}"
        if not measured:
            print(f"{row['method']:<8} {row['step_ms']:>10.1f} {rate}")
            continue
        spread = (f"{row['step_ms']:.1f} [{row['step_ms_p25']:.1f}-{row['step_ms_p75']:.1f}]"
                  if row["step_ms_p25"] == row["step_ms_p25"] else f"{row['step_ms']:.1f}")
        steps = "-" if pd.isna(row["steps_timed"]) else str(row["steps_timed"])
        if row["step_ratio_lo"] == row["step_ratio_lo"]:
            ratio = (f"{row['step_ratio']:.2f} [{row['step_ratio_lo']:.2f}, "
                     f"{row['step_ratio_hi']:.2f}]" + (" ~1" if row["contains_1"] else ""))
        else:
            ratio = "-"
        print(f"{row['method']:<8} {spread:>24} {steps:>6} {ratio:>22} {rate}")
    for _, row in table.iterrows():
        if row["spread_warning"]:
            print(f"WARNING: {row['method']}: too spread to trust: {row['spread_warning']}")


def _jsonable(row) -> dict:
    out = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and value != value):
            out[key] = None
        elif hasattr(value, "item"):
            out[key] = value.item()
        elif str(value) == "<NA>":
            out[key] = None
        else:
            out[key] = value
    return out


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that every cleanup runs as for
    Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise _Terminated(signum)


@contextmanager
def _setting_up(own_process: bool):
    """A run's or plan's set-up, in a process of its own (command()), without cyclic garbage
    collection; what it leaves is then frozen (gc.freeze). The set-up is mostly imports: torch,
    transformers and PEFT make about a million objects that live as long as the process, and
    each full collection walks them all again (about 1 s of CPU over the imports, for next
    to no garbage); frozen, they stay out of every later collection, so that those walk only
    what the work itself makes. Elsewhere (own_process False) nothing changes.

    Limits: cyclic garbage made during the set-up is never collected (a few thousand objects,
    from the model the spec's check builds on the meta device: no tensor memory)."""
    if not own_process:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def command() -> int:
    """The paca-prof command (the console script and python -m paca_prof): main() in a
    process of its own, then a quick end. In its own process a run or plan may keep out
    imports it does not use (unused_imports.py). The interpreter's last garbage collection
    would walk every object the run built (1.5 s after a llama3-8b simulation); the process
    ends next and every file is written and closed, so they are left to the operating system
    (gc.freeze)."""
    code = main(own_process=True)
    sys.stdout.flush()
    gc.freeze()
    return code


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Parse `argv` (default sys.argv) and run the command; returns the exit status. Called
    in a process that goes on (own_process False: a test, a notebook), it changes nothing
    process-wide beyond signal handlers it restores."""
    import signal

    # transformers' own deprecation notices, raised from inside its and PEFT's code: nothing a
    # user of this command can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    # No network at run time: nothing this command loads may reach the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # bitsandbytes' CPU backend, on CPUs with AVX512-BF16, would fetch a 4-bit GEMM kernel from
    # the Hub through the optional `kernels` package; without it, it warns at import and runs
    # its own kernel: nothing a user of this command can act on (and no download is wanted).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import threading

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
        previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM,
                                                                    signal.SIGHUP)}
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.own_process = own_process
        return args.handler(args)
    except UsageError as error:
        print(f"paca-prof: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("paca-prof: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _Terminated as stop:
        name = signal.Signals(stop.signum).name
        print(f"paca-prof: stopped by {name}; nothing was written", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(command())
