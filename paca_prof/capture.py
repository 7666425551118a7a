"""Capture: one profiling session over a model's training steps, the base of every instrument.

It wraps the training code as it is, in the manner of torch.distributed._tools' MemTracker:

    with Capture(model, optimizer) as capture:
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

and sees, without being told:
  module scopes  every module's forward (pre and post hooks) and backward (from the first
                 gradient of its outputs to the last of its inputs, through tensor hooks that
                 form no reference cycles), named by path (modules.py);
  phases         forward from the first module call of a step, backward while the autograd
                 engine runs a backward pass (its first hook to the engine's end-of-pass
                 callback), optimizer between torch.optim's step pre- and post-hooks;
  steps          a step ends when the optimizer step does (steps="optimizer"), when a backward
                 pass does (steps="backward", for a run without optimizer), or when the caller
                 says so (steps="explicit", capture.mark_step()); `step_index` counts them and
                 `micro_batch` counts backward passes within the step (gradient accumulation).

Instruments subscribe: on_scope(enter, exit) with (path, phase), on_phase(start, end) with the
phase, on_step(fn) with the finished step's index. The loss, when computed outside the model,
gets its own scope by passing its module: Capture(model, optimizer, modules={LOSS: loss}).

Limits: one model per session, one thread at a time (the autograd engine's device thread on a
GPU is fine: the main thread waits in backward meanwhile); a loss computed outside the model
and not passed in `modules` runs its backward before the first module hook fires, so backward
time starts at the model's output (ops are still labelled backward by the engine's state,
see `in_backward`); a forward without a backward (evaluation) counts as forward of the step it
falls in. A module whose inputs need no gradient (the first layer under an adapter method) ends
its backward when its trainable parameters have their gradients; one with neither (a frozen
base layer there) has no backward scope. Backward scopes of parallel branches may overlap.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from paca_prof.modules import OPTIMIZER, ROOT

ScopeCallback = Callable[[str, str], None]  # (module path, phase)
PhaseCallback = Callable[[str], None]  # (phase)
STEP_RULES = ("optimizer", "backward", "explicit")


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread now."""
    return torch._C._current_graph_task_id() != -1


class Capture:
    """See the module docstring. `model`'s modules are named by their paths; `modules` adds
    scopes for modules outside it (the loss). `optimizer`: only its steps count (default: any
    torch.optim optimizer's). `steps`: STEP_RULES (default "optimizer" with an optimizer,
    "backward" without)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 modules: dict[str, nn.Module] | None = None, steps: str | None = None):
        self.model = model
        self.optimizer = optimizer
        self.steps = steps or ("optimizer" if optimizer is not None else "backward")
        if self.steps not in STEP_RULES:
            raise ValueError(f"steps must be one of {STEP_RULES}, got {self.steps!r}")
        self.paths = {module: (name or ROOT) for name, module in model.named_modules()}
        for path, module in (modules or {}).items():
            self.paths[module] = path
        self.phase = "idle"
        self.step_index = 0
        self.micro_batch = 0
        self.stack: list[str] = []  # open scopes, innermost last
        self._scope_enter: list[ScopeCallback] = []
        self._scope_exit: list[ScopeCallback] = []
        self._phase_start: list[PhaseCallback] = []
        self._phase_end: list[PhaseCallback] = []
        self._step_end: list[Callable[[int], None]] = []
        self._handles: list = []
        self._param_hooks: set = set()
        self._call_inputs: list[set[int]] = []  # ids of grad inputs of the calls in progress

    # --- subscriptions ---------------------------------------------------------------------

    def on_scope(self, enter: ScopeCallback | None = None, exit: ScopeCallback | None = None):
        if enter:
            self._scope_enter.append(enter)
        if exit:
            self._scope_exit.append(exit)

    def on_phase(self, start: PhaseCallback | None = None, end: PhaseCallback | None = None):
        if start:
            self._phase_start.append(start)
        if end:
            self._phase_end.append(end)

    def on_step(self, fn: Callable[[int], None]) -> None:
        self._step_end.append(fn)

    @property
    def scope_names(self) -> set[str]:
        """Every scope this session can open: the modules' paths and the optimizer's."""
        return set(self.paths.values()) | {OPTIMIZER}

    @property
    def current(self) -> str:
        """The innermost open scope (the root when none is)."""
        return self.stack[-1] if self.stack else ROOT

    # --- the session -----------------------------------------------------------------------

    def __enter__(self) -> Capture:
        # Without cyclic garbage collection during the session, every tensor dies by reference
        # count at the same moment in every run, as in a plain training step (the hooks here
        # form no reference cycles); a collection mid-step would also run weak-reference
        # callbacks at arbitrary points.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        # Under FSDP2, before its hooks: each all-gather falls in its module's scope, and the
        # root's in the step. Elsewhere after the hooks already there, as a plain loop runs.
        from paca_prof.sharding import sharded_parameters

        prepend = sharded_parameters(self.model) is not None
        for module, path in self.paths.items():
            # with_kwargs: transformers passes tensors by keyword (self_attn(hidden_states=...))
            self._handles.append(module.register_forward_pre_hook(
                self._make_pre(path), with_kwargs=True, prepend=prepend))
            self._handles.append(module.register_forward_hook(
                self._make_post(path), with_kwargs=True, always_call=True))
        self._handles.append(register_optimizer_step_pre_hook(self._optimizer_pre))
        self._handles.append(register_optimizer_step_post_hook(self._optimizer_post))
        return self

    def __exit__(self, *exc) -> None:
        for handle in [*self._handles, *self._param_hooks]:
            handle.remove()
        self._handles.clear()
        self._param_hooks.clear()
        if self._gc_was_enabled:
            gc.enable()

    def mark_step(self) -> None:
        """End the step now (steps="explicit"; harmless otherwise only if no step is open)."""
        if self.phase != "idle":
            self._end_phase()
        self._finish_step()

    # --- phases and steps ------------------------------------------------------------------

    def _start_phase(self, phase: str) -> None:
        if self.phase == phase:
            return
        if self.phase != "idle":
            self._end_phase()
        self.phase = phase
        for callback in self._phase_start:
            callback(phase)

    def _end_phase(self) -> None:
        phase, self.phase = self.phase, "idle"
        for callback in self._phase_end:
            callback(phase)

    def _finish_step(self) -> None:
        for callback in self._step_end:
            callback(self.step_index)
        self.step_index += 1
        self.micro_batch = 0

    def _backward_event(self) -> None:
        """A backward hook fired: the backward phase starts with the first one of a pass, and
        ends when the engine has run the whole pass (its final callback)."""
        if self.phase == "backward":
            return
        self._start_phase("backward")
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        # Hooks on parameters that never got a gradient, and scopes that never closed (their
        # inputs' gradients were not needed), end with the pass.
        for handle in self._param_hooks:
            handle.remove()
        self._param_hooks.clear()
        self.stack.clear()
        self._end_phase()
        self.micro_batch += 1
        if self.steps == "backward":
            self._finish_step()

    def _watches(self, optimizer) -> bool:
        return self.optimizer is None or optimizer is self.optimizer

    def _optimizer_pre(self, optimizer, args, kwargs) -> None:
        if not self._watches(optimizer):
            return
        self._start_phase("optimizer")
        self._enter(OPTIMIZER, "optimizer")

    def _optimizer_post(self, optimizer, args, kwargs) -> None:
        if not self._watches(optimizer) or self.phase != "optimizer":
            return
        self._exit(OPTIMIZER, "optimizer")
        self._end_phase()
        if self.steps == "optimizer":
            self._finish_step()

    # --- scopes ----------------------------------------------------------------------------

    def _enter(self, path: str, phase: str) -> None:
        self.stack.append(path)
        for callback in self._scope_enter:
            callback(path, phase)

    def _exit(self, path: str, phase: str) -> None:
        for callback in self._scope_exit:
            callback(path, phase)
        for i in range(len(self.stack) - 1, -1, -1):  # backward scopes may end out of order
            if self.stack[i] == path:
                del self.stack[i]
                break

    def _backward_enter(self, path: str) -> None:
        self._backward_event()
        # A module whose output is also an inner module's (the MLP's is down_proj's) opens its
        # backward on the same gradient, after the inner one: it goes beneath it, so that the
        # innermost scope stays current, as in forward.
        at = len(self.stack)
        while at and _contains(path, self.stack[at - 1]):
            at -= 1
        if at == len(self.stack):
            self._enter(path, "backward")
            return
        self.stack.insert(at, path)
        for callback in self._scope_enter:
            callback(path, "backward")

    def _backward_exit(self, path: str) -> None:
        self._backward_event()
        self._exit(path, "backward")

    def _make_pre(self, path: str):
        def pre_hook(module, args, kwargs):
            if self.phase == "backward":  # gradient checkpointing's recompute
                self._enter(path, "backward")
                return
            if self.phase == "idle":
                self._start_phase("forward")
            self._enter(path, "forward")
            if torch.is_grad_enabled():
                # The module's backward is over when all its input grads are computed or, if
                # no input needs one, when all its trainable parameters have their grads.
                inputs = _grad_tensors((args, kwargs))
                self._call_inputs.append({id(t) for t in inputs})
                if inputs:
                    when_all_grads(inputs, lambda: self._backward_exit(path))
                else:
                    params = [p for p in module.parameters() if p.requires_grad]
                    if params:
                        self._watch_parameters(path, params)

        return pre_hook

    def _make_post(self, path: str):
        def post_hook(module, args, kwargs, output):
            if self.phase == "backward":
                self._exit(path, "backward")
                return
            self._exit(path, "forward")
            if torch.is_grad_enabled():
                # An output that is one of the inputs (nn.Identity, LoRA's dropout at p=0) has
                # its grad computed by someone else: it must not open this module's backward.
                inputs = self._call_inputs.pop() if self._call_inputs else set()
                outputs = [t for t in _grad_tensors(output) if id(t) not in inputs]
                if outputs:  # first output grad arrived: the module's backward starts
                    when_any_grad(outputs, lambda: self._backward_enter(path))

        return post_hook

    def _watch_parameters(self, path: str, params: list[torch.Tensor]) -> None:
        # Hooks on parameters outlive the graph, so each removes itself once it fired, and the
        # end of the backward pass removes those that never fire (no gradient reached them).
        handles = []

        def done():
            self._backward_exit(path)
            for handle in handles:
                handle.remove()
                self._param_hooks.discard(handle)

        handles.extend(when_all_grads(params, done))
        self._param_hooks.update(handles)


def when_all_grads(tensors: list[torch.Tensor], fn: Callable[[], None]) -> list:
    """Call fn once the gradients of all `tensors` have been computed; returns the handles.

    Unlike register_multi_grad_hook(mode="all"), whose hooks hold the tensors' grad_fn nodes
    and so form reference cycles that keep a graph and its saved tensors alive until the
    garbage collector runs, these hooks hold only a counter. Limit: a tensor whose gradient is
    never computed keeps fn from being called.
    """
    remaining = [len(tensors)]

    def count(grad):
        remaining[0] -= 1
        if remaining[0] == 0:
            fn()

    return [t.register_hook(count) for t in tensors]


def when_any_grad(tensors: list[torch.Tensor], fn: Callable[[], None]) -> None:
    """Call fn once, when the first gradient of any of `tensors` has been computed (a light
    register_multi_grad_hook(mode="any") for tensors of one graph)."""
    fired = [False]

    def first(grad):
        if not fired[0]:
            fired[0] = True
            fn()

    for tensor in tensors:
        tensor.register_hook(first)


def _grad_tensors(value) -> list[torch.Tensor]:
    """The tensors that require grad in a module's inputs or outputs (tensors, tuples, lists,
    dicts and transformers' ModelOutput, which is a dict). A plain walk: torch's pytree is
    several times slower, and this runs twice per module call."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                found.append(item)
        elif isinstance(item, tuple | list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _contains(outer: str, inner: str) -> bool:
    """Whether module path `outer` contains `inner` (the root contains every module; the loss
    and optimizer scopes contain nothing)."""
    if outer == inner or inner.startswith("["):
        return False
    return outer == ROOT or inner.startswith(outer + ".")
