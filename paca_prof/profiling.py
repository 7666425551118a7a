"""paca_prof.profile(): a trace of the user's own training loop, in the folder format that
`paca-prof run --device cpu|cuda` writes (DESIGN.md), from the user's real steps and data.

    with paca_prof.profile(model, optimizer, out="traces/my-run", warmup=1, active=3) as prof:
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()                     # after each optimizer step

The schedule is torch.profiler's: `warmup` steps run untouched (no hook at all), then `active`
steps are recorded, as paca-prof run records its steps, each pass a Capture session of its own
so that no instrument's overhead reaches another's result:
  timed      the first active - 1 steps: module and phase latencies (host clock on the CPU,
             CUDA events on a GPU), their medians, and loop_ms, the whole iteration from one
             prof.step() to the next (data loading and the loop's own code included);
  profiled   the last active step: torch.profiler's op (or kernel) sequence with adapter-branch
             flags, activation bytes per module, the categorised memory timeline and its peak.
The batches the model sees in the active steps are recorded too (the `batches` table): their
shapes and padding (attention_mask == 0, else labels == -100), and packed sequences
(position_ids == 0). The trace is written when the profiled step ends; after it, nothing runs.

The method is detected (methods/detect.py). Module paths are the base model's (a PEFT or PaCA
wrapper is looked through), so the trace matches a `paca-prof run` of the same model module
by module; the wrapper's call is the [root] scope. A loss the model computes itself (labels
passed) gets the [loss] scope a measured run gives it: during the active steps the model's
loss_function is called through a module (the same function, the same arguments).

Training is not changed: hooks only read, the loss is the same call, no random number is drawn.
Limits: one model and one thread; gradient accumulation is seen as micro-batches (the
activation bytes are the last micro-batch's, run.yaml's seq and batch its shape); work between
a backward and the optimizer step (gradient clipping) is in loop_ms, not in a phase.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from paca_prof import trace, validate
from paca_prof.capture import Capture
from paca_prof.engines.layers import container_paths, layer_table, module_kinds
from paca_prof.engines.measure import ProfiledStep, _Clock
from paca_prof.metadata import config_dict, device_info, run_metadata
from paca_prof.methods import is_adapter_path
from paca_prof.methods.detect import Detected, detect
from paca_prof.modules import LOSS, ROOT
from paca_prof.results import summary_row
from paca_prof.trace import PHASES

MAX_STEPS = 10**6
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def profile(model: nn.Module, optimizer=None, *, out: str | Path, warmup: int = 1,
            active: int = 3, name: str | None = None) -> Profile:
    """A context manager that profiles the training loop it wraps; call prof.step() after
    each optimizer step. See the module docstring for the schedule and the trace.

    model: what the loop calls (a transformers model, a PEFT or PaCA wrapper of one).
    optimizer: the loop's optimizer (an accelerate wrapper is looked through); only its steps
        count; None: any torch.optim optimizer's.
    out: the trace folder to write; it must not exist (checked on entry, before any step).
    warmup: steps before the active ones (>= 0); active: recorded steps (>= 2: the timed ones
        and the profiled one).
    name: what the trace calls the model (default: its config's name_or_path or model_type).

    ValueError (one line) for bad arguments or an existing `out`; RuntimeError (one line) for
    step() outside the block, or a loop that ends before the profiled step (then nothing is
    written).
    """
    return Profile(model, optimizer, out=out, warmup=warmup, active=active, name=name)


class Profile:
    """The session profile() returns; see there."""

    def __init__(self, model: nn.Module, optimizer=None, *, out: str | Path, warmup: int = 1,
                 active: int = 3, name: str | None = None, command: str | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"profile() takes the model the loop trains (an nn.Module), got "
                             f"{type(model).__name__}")
        self.warmup = validate.number(warmup, "warmup", minimum=0, maximum=MAX_STEPS,
                                      integer=True)
        self.active = validate.number(active, "active", minimum=2, maximum=MAX_STEPS,
                                      integer=True)
        if not isinstance(out, str | Path) or not str(out):
            raise ValueError(f"out must be a folder path, got {type(out).__name__}")
        self.out = Path(out)
        self.name = None if name is None else validate.text(name, "name", max_len=200)
        self.command = command or f"paca_prof.profile() in {_script()}"
        self.model, self.optimizer = model, _torch_optimizer(optimizer)
        self.steps = 0  # steps ended by step()
        self.path: Path | None = None  # the trace folder, once written
        self._state = "new"  # new -> open -> closed
        self._profiled_index = self.warmup + self.active - 1
        self._reservation: trace.Reservation | None = None
        self._session: _Session | None = None

    # --- the block ---------------------------------------------------------------------------

    def __enter__(self) -> Profile:
        if self._state != "new":
            raise RuntimeError("a profile() block runs once; make a new one (with a new out) "
                               "for another loop")
        from paca_prof.engines import check_out

        check_out(self.out)
        reservation = trace.Reservation(self.out)
        reservation.__enter__()  # TraceError (a ValueError) if another writer holds `out`
        self._reservation = reservation
        self._state = "open"
        self._session = _Session(self.model, self.optimizer)
        self._begin(0)
        return self

    def step(self) -> None:
        """End the current step (call it after each optimizer step). Cheap outside the active
        steps; the one that ends the profiled step writes the trace."""
        if self._state != "open":
            raise RuntimeError("prof.step() called outside its `with paca_prof.profile(...)` "
                               "block")
        self._end(self.steps)
        self.steps += 1
        self._begin(self.steps)

    def __exit__(self, exc_type, exc, tb) -> bool:
        state, self._state = self._state, "closed"
        if state != "open":
            return False
        try:
            if self._session is not None:
                self._session.close()
        finally:
            self._reservation.__exit__(None, None, None)
        if exc_type is not None or self.path is not None:
            return False
        if self.steps == 0:
            raise RuntimeError("profile(): no step was taken (call prof.step() after each "
                               "optimizer step); nothing was written")
        raise RuntimeError(f"profile(): the loop took {self.steps} step(s), fewer than warmup "
                           f"{self.warmup} + active {self.active}; nothing was written")

    # --- the schedule --------------------------------------------------------------------------

    def _begin(self, index: int) -> None:
        session = self._session
        if index == self.warmup:
            session.start_timing(index)
        elif index == self._profiled_index:
            session.start_profiling(index)

    def _end(self, index: int) -> None:
        session = self._session
        if self.warmup <= index < self._profiled_index:
            session.end_timed_step(last=index == self._profiled_index - 1)
        elif index == self._profiled_index:
            tables, run = session.finish(self._reservation.staging, index, self)
            self.path = self._reservation.commit(run, tables)
            self._session = None


def _has_paca_layers(model: nn.Module) -> bool:
    """Whether `model` holds PaCA's layers, which run the compiled PartialConnection on a CPU."""
    from paca.layer import PacaLinear

    return any(isinstance(m, PacaLinear) for m in model.modules())


class _Session:
    """What profile() records in its active steps: the model it looks through to, the method
    detected, and the instruments of each pass."""

    def __init__(self, model: nn.Module, optimizer):
        from peft import PeftModel

        self.outer = model
        self.inner = model.get_base_model() if isinstance(model, PeftModel | _paca_model()) \
            else model
        self.optimizer = optimizer
        self.detected: Detected = detect(model)
        self.wrappers = self.detected.record.wrapper_paths(self.inner)
        self.device = next((p.device for p in self.inner.parameters()), torch.device("cpu"))
        self.cuda = self.device.type == "cuda"
        if self.device.type == "cpu" and _has_paca_layers(self.inner):
            from paca.compiled import ensure_built

            ensure_built()  # a first build (~30 s, said on stderr) never lands in a timed step
        self.loss: _LossScope | None = None
        self.batches: _BatchRecorder | None = None
        self.timer: _StepTimer | None = None
        self.timing = False  # the timer's session is open
        self.profiled: ProfiledStep | None = None
        self.loop_ms: list[float] = []
        self.autocast: str | None = None  # the dtype the model's modules ran under autocast
        self._last = 0.0

    def capture(self) -> Capture:
        """A Capture session over the base model, with the wrapper's call as [root] (PEFT's
        tuner calls the base model's forward, not the module, so its own hooks never fire)
        and the model's loss function as [loss]."""
        modules = {LOSS: self.loss} if self.loss is not None else {}
        if self.outer is not self.inner:
            modules[ROOT] = self.outer
        capture = Capture(self.inner, self.optimizer, modules=modules, steps="explicit")
        if self.outer is not self.inner:
            del capture.paths[self.inner]  # one [root] scope: the wrapper's
        return capture

    def start_timing(self, index: int) -> None:
        self.loss = _LossScope.install(self.inner)
        self.batches = _BatchRecorder(self.outer)
        self.batches.begin(index, "timed")
        self.timer = _StepTimer(self.capture(), self.cuda)
        self.timer.capture.__enter__()
        self.timing = True
        if self.cuda:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def end_timed_step(self, last: bool) -> None:
        self.timer.capture.mark_step()  # the timer syncs the device here
        now = time.perf_counter()
        self.loop_ms.append((now - self._last) * 1e3)
        if last:
            self.timing = False
            self.timer.capture.__exit__(None, None, None)
        else:
            self.batches.begin(self.batches.step + 1, "timed")
        self._last = time.perf_counter()

    def start_profiling(self, index: int) -> None:
        self.batches.begin(index, "profiled")
        capture = self.capture()
        # accelerate enters autocast inside the wrapper's forward: look from within the model
        capture.on_scope(enter=self._see_autocast)
        self.profiled = ProfiledStep(capture, self.optimizer, self.cuda)
        self.profiled.__enter__()

    def _see_autocast(self, path: str, phase: str) -> None:
        if phase == "forward" and path != ROOT and torch.is_autocast_enabled(self.device.type):
            self.autocast = DTYPE_NAMES.get(torch.get_autocast_dtype(self.device.type), "other")

    def finish(self, staging: Path, index: int, settings: Profile) -> tuple[dict, dict]:
        """Close the profiled step and build the trace's tables and run.yaml."""
        profiled, self.profiled = self.profiled, None
        profiled.__exit__(None, None, None)
        batches = self.batches.table()
        self._stop_hooks()
        if profiled.static is None:
            raise RuntimeError("profile(): the profiled step ran no forward and no backward; "
                               "nothing was written")
        name = self.detected.name
        result = profiled.result(name, self.detected.record, self.wrappers, index,
                                 self.detected.r, staging / f"trace-{name}.json")
        latencies, phase_ms = self.timer.medians()
        paths = profiled.capture.paths
        layers = layer_table(name, module_kinds(paths), latencies, result["ops"],
                             result["ledger"].by_module, container_paths(paths))
        trainable = sum(p.numel() for p in self.inner.parameters() if p.requires_grad)
        summary = summary_row(
            name, times_ms=phase_ms, peak_breakdown=result["peak_breakdown"],
            n_kernels=len(result["ops"]), activation_bytes=result["ledger"].total_bytes,
            trainable_params=trainable, loop_ms=statistics.median(self.loop_ms),
            **result["device_peaks"])
        tables = {"summary": pd.DataFrame([summary]), "layers": layers, "ops": result["ops"],
                  "memory": result["memory"], "batches": batches}
        return tables, self._metadata(settings, batches)

    def close(self) -> None:
        """Leave whatever is open (the block ended early, or with an error)."""
        if self.timing:
            self.timing = False
            self.timer.capture.__exit__(None, None, None)
        if self.profiled is not None:
            self.profiled.__exit__(RuntimeError, RuntimeError("closed"), None)
            self.profiled = None
        self._stop_hooks()

    def _stop_hooks(self) -> None:
        if self.batches is not None:
            self.batches.remove()
        if self.loss is not None:
            self.loss.uninstall()

    # --- run.yaml ------------------------------------------------------------------------------

    def _metadata(self, settings: Profile, batches: pd.DataFrame) -> dict:
        inner, detected = self.inner, self.detected
        config = getattr(inner, "config", None)
        last = batches[batches["pass"] == "profiled"].tail(1)
        seq = int(last["seq"].iloc[0]) if len(last) else None
        batch = int(last["batch"].iloc[0]) if len(last) else None
        micro = int((batches["pass"] == "profiled").sum())
        timing = (f"median of {settings.active - 1} steps of the loop after {settings.warmup} "
                  "warm-up steps; phases as a Capture session sees them; loop_ms: the whole "
                  "iteration, prof.step() to prof.step(); "
                  + ("CUDA events" if self.cuda else "host perf_counter"))
        memory = ("allocator events of the profiled step (the last active step) from its first "
                  "phase; tensors alive before it that are not weights, parameters, gradients "
                  "or optimizer state (the batch) are not counted")
        assumptions = {
            "timing": timing, "memory": memory,
            "activations": "tensors saved by the profiled step's last forward (its last "
                           "micro-batch, whose shape run.yaml's seq and batch give)",
            "method": detected.description.get("detected_from", "detected"),
        }
        return run_metadata(
            command=settings.command, model_name=settings.name or _model_name(inner),
            model_config=config_dict(config) if config is not None else {},
            seq=seq, batch=batch, dtype=_dtype_name(inner), seed=None,
            device=device_info(str(self.device)),
            sources={"time": "measured", "bytes": "measured"},
            methods={detected.name: detected.description},
            recipe=self._recipe(micro), assumptions=assumptions,
            profile={"warmup": settings.warmup, "active": settings.active,
                     "timed_steps": settings.active - 1,
                     "profiled_step": settings.warmup + settings.active - 1,
                     "micro_batches": micro},
            batches=self.batches.describe(batches))

    def _recipe(self, micro_batches: int) -> dict:
        """run.yaml's recipe, as observed: the Recipe's keys where they apply."""
        inner, optimizer = self.inner, self.optimizer
        config = getattr(inner, "config", None)
        recipe = {
            "targets": self.detected.targets,
            "attention": getattr(config, "_attn_implementation", None),
            "grad_ckpt": _checkpointing(inner),
            "amp": self.autocast,
            "grad_accum": micro_batches,
            "loss": "hf" if self.loss is not None and self.loss.calls else "the loop's own",
            "loss_detail": ("the model's own loss_function (labels passed), as [loss]"
                            if self.loss is not None and self.loss.calls else
                            "computed outside the model: its ops are charged to [root]"),
        }
        if optimizer is not None:
            group = optimizer.param_groups[0]
            kind = type(optimizer)
            recipe["optimizer"] = kind.__name__.lower()
            recipe["lr"] = float(group.get("lr", float("nan")))
            recipe["optimizer_detail"] = (f"{kind.__module__}.{kind.__qualname__}, lr "
                                          f"{recipe['lr']:g}, foreach {group.get('foreach')}")
        else:
            recipe["optimizer"] = None
        return recipe


class _StepTimer:
    """The timing pass's instrument over a user's steps (as engines/measure.timing_pass times
    the engines' steps): per step, the time in each (module, phase) scope and each phase."""

    def __init__(self, capture: Capture, cuda: bool):
        self.capture = capture
        self.clock = _Clock(cuda)
        self._open: dict[tuple[str, str], list] = defaultdict(list)
        self._intervals: list[tuple[str, str, object, object]] = []
        self.per_step: list[dict] = []
        capture.on_scope(self._enter, self._leave)
        capture.on_phase(start=lambda phase: self._enter(f"phase:{phase}", phase),
                         end=lambda phase: self._leave(f"phase:{phase}", phase))
        capture.on_step(self._step_done)

    def _enter(self, path, phase):
        self._open[(path, phase)].append(self.clock.stamp())

    def _leave(self, path, phase):
        starts = self._open.get((path, phase))
        if starts:
            self._intervals.append((path, phase, starts.pop(), self.clock.stamp()))

    def _step_done(self, index):
        self.clock.sync()
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for path, phase, start, end in self._intervals:
            totals[(path, phase)] += self.clock.ms(start, end)
        self.per_step.append(totals)
        self._intervals.clear()
        self._open.clear()

    def medians(self) -> tuple[dict, dict]:
        """({(path, phase): median ms}, {phase: median ms, "step": their sum})."""
        keys = set().union(*self.per_step)
        medians = {key: statistics.median(s[key] for s in self.per_step if key in s)
                   for key in keys}
        phase_ms = {p: medians.get((f"phase:{p}", p), 0.0) for p in PHASES}
        phase_ms["step"] = sum(phase_ms.values())
        latencies = {k: v for k, v in medians.items() if not k[0].startswith("phase:")}
        return latencies, phase_ms


class _LossScope(nn.Module):
    """A transformers model's own loss function, called through a module so that a Capture
    session gives it the [loss] scope (engines/step.CausalLMLoss is the engines' one). The
    same function gets the same arguments; `calls` counts them."""

    def __init__(self, function):
        super().__init__()
        self.function = function
        self.calls = 0
        self._model: nn.Module | None = None
        self._saved: tuple[bool, object] = (False, None)

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)

    @classmethod
    def install(cls, model: nn.Module) -> _LossScope | None:
        """Route `model`'s loss_function through a new scope; None for a model without
        transformers' settable loss_function."""
        prop = getattr(type(model), "loss_function", None)
        if not isinstance(prop, property) or prop.fset is None:
            return None
        scope = cls(model.loss_function)
        scope._model = model
        scope._saved = ("_loss_function" in model.__dict__, model.__dict__.get("_loss_function"))
        model.loss_function = scope.__call__  # the property's setter: a plain attribute
        return scope

    def uninstall(self) -> None:
        model, self._model = self._model, None
        if model is None:
            return
        had, previous = self._saved
        if had:
            model.__dict__["_loss_function"] = previous
        else:
            model.__dict__.pop("_loss_function", None)


class _BatchRecorder:
    """The batches the model is called with in the active steps: shape, padding tokens
    (attention_mask == 0, else labels == -100) and sequences (position_ids == 0, for packed
    batches), one row per training forward; and the autocast dtype it runs under. Counts stay
    on the batch's device until the table is made (no synchronisation per call)."""

    def __init__(self, module: nn.Module):
        self.signature = _signature(module)
        self.rows: list[dict] = []
        self.step, self.kind, self._micro = 0, "timed", 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def begin(self, step: int, kind: str) -> None:
        self.step, self.kind, self._micro = step, kind, 0

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        inputs = _named_inputs(self.signature, args, kwargs)
        tokens = next((inputs[k] for k in ("input_ids", "inputs_embeds")
                       if isinstance(inputs.get(k), torch.Tensor)), None)
        if tokens is None or tokens.dim() < 2:
            return
        batch, seq = int(tokens.shape[0]), int(tokens.shape[1])
        padding, source = None, None
        for key, pad in (("attention_mask", 0), ("labels", -100)):
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == (batch, seq):
                padding, source = (value == pad).sum(), f"{key} == {pad}"
                break
        positions = inputs.get("position_ids")
        sequences = ((positions == 0).sum() if isinstance(positions, torch.Tensor)
                     and positions.shape[-1] == seq else None)
        self.rows.append({"step": self.step, "micro_batch": self._micro, "pass": self.kind,
                          "batch": batch, "seq": seq, "tokens": batch * seq,
                          "padding_tokens": padding, "sequences": sequences,
                          "padding_from": source})
        self._micro += 1

    def table(self) -> pd.DataFrame:
        """The batches table (trace.BATCH_COLUMNS), padding_from kept for describe()."""
        rows = [{**row, **{k: None if row[k] is None else int(row[k])
                           for k in ("padding_tokens", "sequences")}} for row in self.rows]
        frame = pd.DataFrame(rows, columns=["step", "micro_batch", "pass", "batch", "seq",
                                            "tokens", "padding_tokens", "sequences",
                                            "padding_from"])
        known = frame["padding_tokens"].notna()
        frame["padding_fraction"] = (frame["padding_tokens"].where(known).astype(float)
                                     / frame["tokens"].astype(float))
        return frame

    @staticmethod
    def describe(table: pd.DataFrame) -> dict:
        """run.yaml's `batches`: how padding was found, the shapes seen, the padding share."""
        sources = sorted(set(table["padding_from"].dropna()))
        shapes = (table.groupby(["batch", "seq"]).size().reset_index(name="micro_batches")
                  .to_dict("records"))
        known = table["padding_tokens"].notna()
        padded = table.loc[known, "padding_tokens"].sum()
        fraction = float(padded / table.loc[known, "tokens"].sum()) if known.any() else None
        return {
            "padding_from": " and ".join(sources) if sources else
            "not found: the model got no attention_mask or labels of the batch's shape",
            "padding_fraction": fraction,
            "packed": bool((table["sequences"].dropna() > table.loc[
                table["sequences"].notna(), "batch"]).any()),
            "shapes": [{k: int(v) for k, v in shape.items()} for shape in shapes],
            "micro_batches": len(table),
        }


# --- helpers -------------------------------------------------------------------------------------

def _torch_optimizer(optimizer):
    """The torch.optim optimizer whose steps count: the innermost of wrappers that hold it as
    `.optimizer` (accelerate's AcceleratedOptimizer, itself an Optimizer subclass whose step
    calls the inner one's)."""
    found = optimizer
    for _ in range(8):
        inner = getattr(found, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        found = inner
    if found is None or isinstance(found, torch.optim.Optimizer):
        return found
    raise ValueError(f"optimizer must be a torch.optim.Optimizer (or a wrapper holding one as "
                     f".optimizer), got {type(optimizer).__name__}")


def _paca_model() -> type:
    from paca.model import PacaModel

    return PacaModel


def _signature(module: nn.Module):
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def _named_inputs(signature, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (keywords, and positional ones by the signature)."""
    if signature is None or not args:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    named = {}
    for key, value in bound.items():
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[key] = value
    return named


def _dtype_name(model: nn.Module) -> str:
    """The base weights' dtype (fp32, bf16, fp16; torch's name for another)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not is_adapter_path(name):
            return DTYPE_NAMES.get(param.dtype, str(param.dtype).removeprefix("torch."))
    return "fp32"


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "model_type", None)
    return str(name or type(model).__name__)[:200]


def _script() -> str:
    """The running script's file name (not its arguments, which may hold secrets)."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
