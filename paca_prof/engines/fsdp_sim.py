"""One rank's memory under FSDP2, simulated from a single-process step at the rank's batch.

The simulator steps the unsharded model on the meta device as one process would (so every
activation, logit and temporary is exactly a single-process run's at the per-rank batch), and
records when each FSDP2 group's hooks would fire: the forward and backward scopes of every
decoder layer, and the root's. This module then rewrites that step's memory as FSDP2 lays it
out on one rank:

- before the step: every parameter's dim-0 shard (padded to ceil(rows / world) rows, as FSDP2
  stores it; frozen bases too) and the optimizer states of the trainable shards (unpadded:
  this rank's rows);
- unshard (a group's pre-forward; its pre-backward when it was resharded after forward): the
  all-gather output (world x the padded shard bytes of the group), on gloo one scratch buffer
  of the same size during the collective, then the unsharded parameters (copied out), then
  the all-gather output freed;
- backward prefetch: a group's pre-backward also unshards the group that runs next in
  backward (FSDP2's default); forward prefetch only on nccl (CUDA runs ahead of the kernels,
  so the next layer's all-gather is issued during the current one);
- reshard: the unsharded parameters freed (after forward with reshard_after_forward, never
  for the root; after backward always);
- reduce-scatter (a group's post-backward; the root's and those of a group whose inputs need
  no gradient at the end of backward): the input buffer (world x padded trainable shard),
  the unsharded gradients freed, the output (the sharded gradients, until zero_grad), on gloo
  a scratch buffer of the input's size, then the input freed;
- optimizer: allocations the size of a trainable parameter become the size of its shard.

Categories are the measured run's: the sharded parameters and their optimizer states are
weights / trainable / optimizer, the sharded gradients gradients, and the unsharded
parameters, unsharded gradients and collective buffers rest.

Limits: one FSDP2 group per decoder layer plus the root (paca_prof.engines.fsdp.shard); the
collective's own scratch is gloo's on the CPU as measured (one buffer of the message size) or
none (nccl); gradient accumulation reduce-scatters every micro-batch as FSDP2 does; no CPU
offload, no mixed-precision policy (parameters all-gathered in their own dtype).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from paca_prof.distributed import Distributed, shard_rows
from paca_prof.memory import MEMORY_CATEGORIES, MemoryEvent
from paca_prof.modules import ROOT

_KEYS = itertools.count(-1, -1)  # synthetic storage keys (real ones are positive)


@dataclass
class Group:
    """One FSDP2 parameter group: a decoder layer, or the root (every other parameter)."""

    path: str
    params: list[nn.Parameter]
    index: int  # forward order; the root is -1

    @property
    def is_root(self) -> bool:
        return self.index < 0


@dataclass
class Schedule:
    """Ticks (the simulator's op clock) at which the FSDP2 hooks fire in the recorded step."""

    forward_enter: dict[str, list[int]] = field(default_factory=dict)
    forward_exit: dict[str, list[int]] = field(default_factory=dict)
    backward_enter: dict[str, list[int]] = field(default_factory=dict)
    backward_exit: dict[str, list[int]] = field(default_factory=dict)
    inputs_need_grad: dict[str, bool] = field(default_factory=dict)
    phases: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, start, end)

    def add(self, kind: str, path: str, tick: int) -> None:
        if kind in ("forward_enter", "forward_exit", "backward_enter", "backward_exit"):
            getattr(self, kind).setdefault(path, []).append(tick)


def groups_of(model: nn.Module) -> list[Group]:
    """The FSDP2 groups of a model sharded as engines/fsdp.shard does: one per decoder layer,
    in order, then the root with every parameter left."""
    from paca_prof.engines.fsdp import decoder_layers

    paths = {id(m): name for name, m in model.named_modules()}
    groups, seen = [], set()
    for index, layer in enumerate(decoder_layers(model)):
        params = [p for p in layer.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append(Group(paths[id(layer)] or ROOT, params, index))
    rest = [p for p in model.parameters() if id(p) not in seen]
    groups.append(Group(ROOT, rest, -1))
    return groups


def _shape_bytes(param: torch.Tensor, world: int, rank: int) -> tuple[int, int, int]:
    """(full bytes, this rank's padded shard bytes, this rank's held shard bytes)."""
    rows = param.shape[0] if param.dim() else 1
    per_row = (param.numel() // rows if rows else 0) * param.element_size()
    held, padded = shard_rows(rows, world, rank)
    return param.numel() * param.element_size(), padded * per_row, held * per_row


def message_bytes(groups: list[Group], world: int) -> list[tuple[str, int, int]]:
    """Per group (decoder layers in order, then the root with path ""): the all-gather's
    output bytes and the reduce-scatter's input bytes (world x the padded shards)."""
    messages = []
    for group in groups:
        shards = [(_shape_bytes(p, world, 0)[1], p.requires_grad) for p in group.params]
        messages.append(("" if group.is_root else group.path,
                         world * sum(b for b, _ in shards),
                         world * sum(b for b, trained in shards if trained)))
    layers = [m for m, g in zip(messages, groups) if not g.is_root]
    return layers + [m for m, g in zip(messages, groups) if g.is_root]


def sharded_static(model: nn.Module, optimizer, distributed: Distributed,
                   rank: int) -> tuple[dict[str, int], list[tuple[int, int, str]]]:
    """Bytes per category alive before the step on `rank`, and the storages (key, bytes,
    category) for the allocator model: padded parameter shards, buffers whole, optimizer
    states of this rank's rows (a state the shape of its parameter is sharded with it; others,
    as a step count, kept)."""
    world = distributed.world_size
    static = {c: 0 for c in MEMORY_CATEGORIES}
    storages = []

    def add(nbytes: int, category: str) -> None:
        static[category] += nbytes
        storages.append((next(_KEYS), nbytes, category))

    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        _, padded, _ = _shape_bytes(p, world, rank)
        add(padded, "trainable" if p.requires_grad else "weights")
    for b in model.buffers():
        add(b.untyped_storage().nbytes(), "weights")
    if optimizer is not None:
        for p, state in optimizer.state.items():
            rows = p.shape[0] if p.dim() else 1
            held, _ = shard_rows(rows, world, rank)
            for value in state.values():
                if not hasattr(value, "untyped_storage") or getattr(value, "is_paged", False):
                    continue
                nbytes = value.untyped_storage().nbytes()
                if tuple(value.shape) == tuple(p.shape) and rows:
                    nbytes = nbytes * held // rows
                elif value.numel() > 1:  # block-wise or factored states: by share of elements
                    nbytes = -(-nbytes // world)
                add(nbytes, "optimizer")
    return static, storages


def rewrite(events: list[MemoryEvent], gradients: list[tuple[int, float]],
            schedule: Schedule, groups: list[Group], grad_keys: dict[int, int],
            distributed: Distributed, rank: int, backend: str,
            trainable_sizes: dict[int, int]) -> tuple[list[MemoryEvent], list[tuple[int, float]]]:
    """The single-process step's events and gradient snapshots, as one FSDP2 rank sees them
    (module docstring). `grad_keys`: storage key of each trainable parameter's gradient at the
    end of backward -> its group's index in `groups`; `trainable_sizes`: full bytes of a
    trainable parameter -> its shard's bytes on this rank."""
    world = distributed.world_size
    gloo = backend == "gloo"
    inserted: list[tuple[float, int, MemoryEvent]] = []
    order = itertools.count()

    def at(tick: float, nbytes: int, key: int, phase: str | None) -> None:
        # Before the op dispatched at `tick` (original events carry whole ticks).
        inserted.append((tick - 0.5, next(order), MemoryEvent(tick - 0.5, key, nbytes, phase)))

    phase_at = _phase_lookup(schedule.phases)
    layers = [g for g in groups if not g.is_root]
    root = next(g for g in groups if g.is_root)
    sizes = {g.index: [_shape_bytes(p, world, rank) for p in g.params] for g in groups}
    trainable = {g.index: [b for p, b in zip(g.params, sizes[g.index]) if p.requires_grad]
                 for g in groups}
    gathered: dict[int, list[int]] = {}  # group index -> keys of its unsharded params
    issued: dict[int, tuple[int, int]] = {}  # group index -> its all-gather output (key, bytes)
    deferred: list[tuple[int, int]] = []  # a forward all-gather output, freed at the next

    def issue(group: Group, tick: float) -> None:
        """The all-gather: its output, and gloo's two scratch buffers one after the other."""
        if group.index in gathered or group.index in issued or not group.params:
            return
        phase = phase_at(tick)
        out = world * sum(padded for _, padded, _ in sizes[group.index])
        issued[group.index] = (next(_KEYS), out)
        at(tick, out, issued[group.index][0], phase)
        if gloo:
            for _ in range(2):
                scratch = next(_KEYS)
                at(tick, out, scratch, phase)
                at(tick, -out, scratch, phase)

    def wait(group: Group, tick: float) -> None:
        """The copy-out: the unsharded parameters, then the output freed (in forward, the
        previous group's output, which FSDP2 keeps until the next copy-out)."""
        if group.index not in issued:
            return
        phase = phase_at(tick)
        keys = []
        for full, _, _ in sizes[group.index]:
            keys.append(next(_KEYS))
            at(tick, full, keys[-1], phase)
        gathered[group.index] = keys
        key, out = issued.pop(group.index)
        if phase == "forward":
            for old_key, old_out in deferred:
                at(tick, -old_out, old_key, phase)
            deferred[:] = [(key, out)]
        else:
            at(tick, -out, key, phase)

    def unshard(group: Group, tick: float) -> None:
        issue(group, tick)
        wait(group, tick)

    def release_deferred(tick: float) -> None:
        for old_key, old_out in deferred:
            at(tick, -old_out, old_key, phase_at(tick))
        deferred.clear()

    def reshard(group: Group, tick: float) -> None:
        keys = gathered.pop(group.index, None)
        if keys is None:
            return
        phase = phase_at(tick)
        for key, (full, _, _) in zip(keys, sizes[group.index]):
            at(tick, -full, key, phase)

    sharded_grads: list[tuple[int, float]] = []

    def reduce_scatter(group: Group, tick: float, grad_frees: dict[int, list[int]]) -> None:
        shard = sum(padded for _, padded, _ in trainable[group.index])
        if not shard:
            return
        phase = phase_at(tick)
        in_key, out_key = next(_KEYS), next(_KEYS)
        at(tick, world * shard, in_key, phase)
        for key, nbytes in grad_frees.get(group.index, []):
            at(tick, -nbytes, key, phase)
        at(tick, shard, out_key, phase)
        if gloo:
            scratch = next(_KEYS)
            at(tick, world * shard, scratch, phase)
            at(tick, -world * shard, scratch, phase)
        at(tick, -world * shard, in_key, phase)
        sharded_grads.append((out_key, tick))
        pending_frees.append((out_key, shard))

    pending_frees: list[tuple[int, int]] = []  # sharded grads, freed where zero_grad frees

    # The unsharded gradients: their frees move from zero_grad to their group's reduce-scatter.
    # A key is a storage's only while it lives: the gradient is the last allocation at its key
    # before backward ends, and its free the next free there.
    backward_end = max((e for p, _, e in schedule.phases if p == "backward"), default=None)
    made_at: dict[int, int] = {}
    for i, e in enumerate(events):
        if e.nbytes > 0 and e.key in grad_keys and (backward_end is None
                                                    or e.t <= backward_end):
            made_at[e.key] = i
    grad_allocs = {}
    grad_frees_by_group: dict[int, list[tuple[int, int]]] = {}
    zero_grad_tick = None
    kept = []
    for i, e in enumerate(events):
        if e.key in made_at:
            if e.nbytes > 0 and made_at[e.key] == i:
                grad_allocs[e.key] = e.nbytes
            elif e.nbytes < 0 and e.key in grad_allocs:
                grad_frees_by_group.setdefault(grad_keys[e.key], []).append(
                    (e.key, grad_allocs.pop(e.key)))
                zero_grad_tick = e.t if zero_grad_tick is None else zero_grad_tick
                continue
        kept.append(e)
    for key, nbytes in grad_allocs.items():  # never freed in the step: freed by the RS anyway
        grad_frees_by_group.setdefault(grad_keys[key], []).append((key, nbytes))

    # Forward: the root first (its pre-forward runs before any layer), then each layer.
    forward = next(((s, e) for p, s, e in schedule.phases if p == "forward"), None)
    backward_spans = [(s, e) for p, s, e in schedule.phases if p == "backward"]
    if forward is not None:
        unshard(root, forward[0])
        for i, layer in enumerate(layers):
            for tick in schedule.forward_enter.get(layer.path, [])[:1]:
                unshard(layer, tick)
                if backend == "nccl" and i + 1 < len(layers):
                    issue(layers[i + 1], tick)  # CUDA runs ahead: the next all-gather is out
            for tick in schedule.forward_exit.get(layer.path, [])[:1]:
                if distributed.reshard_after_forward:
                    reshard(layer, tick)
        root_exit = schedule.forward_exit.get(ROOT, [forward[1]])[0]
        release_deferred(root_exit)  # the root's post-forward frees the last output
    if backward_spans:
        start, end = backward_spans[0]
        # The root's pre-backward: when the model's output gets its gradient (the first
        # backward scope of a model module); it prefetches the last layer.
        firsts = [ticks[0] for path, ticks in schedule.backward_enter.items()
                  if not path.startswith("[")] or [start]
        root_pre = min(firsts)
        unshard(root, root_pre)
        if layers:
            issue(layers[-1], root_pre)
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            enter = schedule.backward_enter.get(layer.path, [None])[0]
            if enter is not None:
                issue(layer, enter)
                wait(layer, enter)
                if i > 0:
                    issue(layers[i - 1], enter)  # backward prefetch
            exit_ = schedule.backward_exit.get(layer.path, [None])[0]
            at_end = exit_ is None or not schedule.inputs_need_grad.get(layer.path, True)
            tick = end if at_end else exit_
            reshard(layer, tick)
            reduce_scatter(layer, tick, grad_frees_by_group)
        reshard(root, end)
        reduce_scatter(root, end, grad_frees_by_group)
    if zero_grad_tick is not None:
        for key, nbytes in pending_frees:
            at(zero_grad_tick + 0.5, -nbytes, key, phase_at(zero_grad_tick))

    optimizer = [(s, e) for p, s, e in schedule.phases if p == "optimizer"]

    def scaled(e: MemoryEvent) -> MemoryEvent:
        if any(s <= e.t <= end_ for s, end_ in optimizer) and abs(e.nbytes) in trainable_sizes:
            sign = 1 if e.nbytes > 0 else -1
            return MemoryEvent(e.t, e.key, sign * trainable_sizes[abs(e.nbytes)], e.phase,
                               e.logits_scope)
        return e

    merged = [(e.t, -1, scaled(e)) for e in kept] + inserted
    merged.sort(key=lambda item: (item[0], item[1]))
    new_gradients = [(k, t) for k, t in gradients if k not in grad_keys]
    new_gradients += [(k, tick) for k, tick in sharded_grads]  # made at tick - 0.5
    return [e for _, _, e in merged], new_gradients


def _phase_lookup(phases: list[tuple[str, int, int]]):
    def phase_at(tick: float) -> str | None:
        for phase, start, end in phases:
            if start <= tick <= end:
                return phase
        return None

    return phase_at
