"""Depth replication: a deep model's simulated step, made exactly from a shallow model's.

The decoder layers of a llama-like model are identical, and so is what a training step does in
each of them: the same ops on the same shapes, the same storages made and freed in the same
order, the same bytes saved for backward, the same per-parameter work in the optimizer step.
So the simulator (engines/simulate.py) runs a model of SHALLOW_DEPTH = 5 decoder layers and
builds the step of the N-layer model from it by repeating what belongs to layer MIDDLE = 2
N - 4 times, in place: its ops (module paths renamed), its memory events (fresh storage keys,
each free matched to the copy of its allocation), its saved tensors, its static storages
(weights, trainable parameters, optimizer state) and its modules. Layers 0 and 1 stay as they
are, layers 3 and 4 become N-2 and N-1. What is built is the event stream itself, so the
memory timeline, its peak and breakdown, and the caching-allocator replay (reserved.py) run
on the full-depth stream as they would on a full-depth simulation; tests/test_replicate.py
checks summaries, layers, ops and memory tables equal to full-depth ones.

How the stream is cut. The recorder keeps a journal: every dispatch, allocation and free in
order, with the scope it happened in. Each entry gets a layer tag: the decoder layer whose scope
was open; outside every layer (the optimizer step, zero_grad), the layer of the tensors it
touches (a parameter, its gradient, its optimizer state, a temporary made from them) or, for a
free, of the allocation it frees. A foreach op spans layers: it stays once, its list arguments'
shapes and bytes are extended, and each output is tagged by its position in the lists.
Entries outside every layer between two adjacent layers' (a layer's input freed by the decoder
after the next layer ran) belong to the earlier one, and so do the frees of the last layer's
input right after it. Runs of MIDDLE's entries are
repeated ascending where layers ascend around them (forward, parameter lists) and descending
where they descend (backward, a list freed from its end).

When it is refused (NotReplicable, and the simulator simulates the whole depth instead): a
config whose layers are not all alike (layer_types with more than one type: gemma2/3's sliding
window alternation, qwen3's max_window_layers with sliding windows; MoE models with dense
layers: mlp_only_layers, first_k_dense_replace, decoder_sparse_step > 1); a model with N <= 5
layers (nothing to gain); no decoder-layer list found; and, checked on every step, layers 1, 2
and 3 not doing exactly the same thing (a journal signature per layer), a reference further
than the next layer, an op across layers with FLOPs or with an output whose size depends on the
layer count (gradient clipping's stacked norms), or a free that would be matched twice.

Limits: exactness rests on the middle layers being alike, which the per-step check verifies on
layers 1-3 only: a difference that first shows at layer 4 or deeper (none in the architectures
here) would not be seen.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SHALLOW_DEPTH = 5
MIDDLE = 2  # the layer repeated: its neighbours 1 and 3 are middle layers too
_ALIKE = {MIDDLE - 1, MIDDLE, MIDDLE + 1}  # checked alike on every step



class NotReplicable(Exception):
    """This model's or this step's layers cannot be replicated exactly; simulate in full."""


def at_depth(spec, depth: int):
    """A copy of `spec` whose model has `depth` decoder layers (a deep-copied config; a
    per-layer layer_types list cut to its first `depth` entries)."""
    config = copy.deepcopy(spec.config)
    config.num_hidden_layers = depth
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:depth]
    truncated = copy.copy(spec)
    truncated.config = config
    return truncated


def refusal(config) -> str | None:
    """Why this config's layers are not replicated (None: they are), before any model is built."""
    n_layers = getattr(config, "num_hidden_layers", 0) or 0
    if n_layers <= SHALLOW_DEPTH:
        return f"{n_layers} layers: simulated in full"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        return "layers of several types (layer_types)"
    if getattr(config, "use_sliding_window", False) and \
            getattr(config, "max_window_layers", n_layers) < n_layers:
        return "sliding window on some layers only (max_window_layers)"
    # dense layers among sparse ones; a dense layer 0 alone is fine (layer 0 is never repeated)
    if getattr(config, "mlp_only_layers", None):
        return "dense and sparse layers (mlp_only_layers)"
    if (getattr(config, "first_k_dense_replace", 0) or 0) > 1:
        return "dense and sparse layers (first_k_dense_replace)"
    if getattr(config, "moe_layer_freq", None) not in (None, 1):
        return "dense and sparse layers (moe_layer_freq)"
    if (getattr(config, "decoder_sparse_step", 1) or 1) > 1:
        return "dense and sparse layers (decoder_sparse_step)"
    return None


@dataclass
class Recording:
    """What one simulated step leaves, before it becomes tables: the op rows, the memory events,
    each saved tensor's allocating event (index -> saving module), the gradient snapshots
    ((key, t): key held a gradient at t), bytes saved per module, every scope's kind (module
    order), container paths, and the static storages ((key, bytes, category, owner path)).
    `journal` is the recorder's (see the module docstring); `trainable` is per owner path."""

    ops: list[dict]
    events: list
    saved_events: dict[int, str]
    gradients: list[tuple[int, float]]
    by_module: dict[str, int]
    kinds: dict[str, str]
    containers: set[str]
    static: list[tuple[int, int, str, str]]
    trainable: list[tuple[str, int]]
    paged: list[tuple[str, int]]
    journal: list = field(default_factory=list)


def layer_prefix(named_modules: Iterable[tuple[str, object]], n_layers: int) -> str:
    """The path of the model's decoder-layer list: an nn.ModuleList of `n_layers` modules whose
    path ends with "layers" (NotReplicable if there is not exactly one)."""
    from torch import nn

    found = [name for name, module in named_modules
             if isinstance(module, nn.ModuleList) and len(module) == n_layers
             and name.rsplit(".", 1)[-1] == "layers"]
    if len(found) != 1:
        raise NotReplicable(f"no single decoder-layer list of {n_layers} layers")
    return found[0]


class _Layers:
    """Layer indices in paths under one prefix, and renaming them. Both are cached by path
    (a step has a few hundred distinct paths and tens of thousands of ops and events), so that
    each path is matched once and each renamed path made once."""

    def __init__(self, prefix: str):
        self.pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?=\.|$)")
        self.prefix = prefix
        self._index: dict[str, int | None] = {}
        self._renamed: dict[tuple[str, int], str] = {}

    def of(self, path: str | None) -> int | None:
        if path is None:
            return None
        try:
            return self._index[path]
        except KeyError:
            match = self.pattern.match(path)
            index = self._index[path] = int(match.group(1)) if match else None
            return index

    def rename(self, path: str, shift: int) -> str:
        """`path` with its layer index moved by `shift` (unchanged outside the layers)."""
        if shift == 0:
            return path
        try:
            return self._renamed[(path, shift)]
        except KeyError:
            index = self.of(path)
            renamed = path if index is None else \
                f"{self.prefix}.{index + shift}{path[self.pattern.match(path).end():]}"
            self._renamed[(path, shift)] = renamed
            return renamed


class _Plan:
    """Where each shallow layer goes at full depth: layers below MIDDLE stay, MIDDLE becomes
    MIDDLE..MIDDLE+extra, those above move up by `extra`."""

    def __init__(self, n_layers: int):
        self.extra = n_layers - SHALLOW_DEPTH

    def images(self, tag: int) -> list[int]:
        if tag < MIDDLE:
            return [tag]
        if tag == MIDDLE:
            return list(range(MIDDLE, MIDDLE + self.extra + 1))
        return [tag + self.extra]

    def source(self, layer: int) -> int:
        """The shallow layer whose copy is full-depth `layer`."""
        if layer < MIDDLE:
            return layer
        if layer <= MIDDLE + self.extra:
            return MIDDLE
        return layer - self.extra


def expand_runs(items: list, tags: list[int | None], plan: _Plan,
                ascending: Callable[[int], bool] = lambda i: True) -> list[tuple[object, int]]:
    """Each item with the shift of its layer: (item, shift), in full-depth order. A run of
    consecutive MIDDLE items repeats for each copy (ascending or, where `ascending(start)` says
    not, descending); other layers move to their single image; untagged items stay (shift 0)."""
    out: list[tuple[object, int]] = []
    i = 0
    while i < len(items):
        tag = tags[i]
        j = i
        while j < len(items) and tags[j] == tag:
            j += 1
        run = items[i:j]
        if tag is None:
            out.extend((item, 0) for item in run)
        elif tag == MIDDLE:
            layers = plan.images(MIDDLE)
            for layer in (layers if ascending(i) else reversed(layers)):
                out.extend((item, layer - MIDDLE) for item in run)
        else:
            shift = plan.images(tag)[0] - tag
            out.extend((item, shift) for item in run)
        i = j
    return out


def replicate(rec: Recording, prefix: str, n_layers: int) -> Recording:
    """The full-depth Recording of an N-layer model from a SHALLOW_DEPTH-layer one's (see the
    module docstring); NotReplicable where it cannot be exact."""
    from paca_prof.memory import MemoryEvent

    layers, plan = _Layers(prefix), _Plan(n_layers)
    journal = rec.journal
    tags, spans = _tag(journal, rec, layers)
    _assign_glue(tags, [layers.of(_scope(entry)) is not None for entry in journal],
                 [entry[0] == "f" for entry in journal])
    refs = _references(journal, rec)
    positions, by_layer = _positions(tags)
    _check_alike(journal, tags, refs, positions, by_layer, rec, layers)
    direction = _directions(tags)

    new_events: list = []
    new_ops: list[dict] = []
    saved: dict[int, str] = {}
    copies: dict[tuple[int, int], int] = {}  # (event index, full-depth layer) -> new key
    freed: set[int] = set()
    event_copies: dict[int, list[int]] = {}
    ticks = 0
    for (index, shift) in expand_runs(list(range(len(journal))), tags, plan,
                                      lambda start: direction[start]):
        entry = journal[index]
        kind, tag = entry[0], tags[index]
        layer = None if tag is None else tag + shift
        if kind == "d":
            ticks += 1
            op = entry[2]
            if op >= 0:
                row = dict(rec.ops[op])
                row["module"] = layers.rename(row["module"], shift)
                row["seq_no"] = len(new_ops)
                if index in spans:  # a foreach op across layers
                    row["shapes"], row["bytes"] = _extended(row, spans[index], plan)
                new_ops.append(row)
            continue
        event = rec.events[entry[1]]
        if kind == "a":
            key = len(new_events) + 1  # fresh keys; never reused
            copies[(entry[1], layer if layer is not None else -1)] = key
            event_copies.setdefault(entry[1], []).append(len(new_events))
            if entry[1] in rec.saved_events:
                saved[len(new_events)] = layers.rename(rec.saved_events[entry[1]], shift)
            new_events.append(MemoryEvent(t=float(ticks - 1), key=key, nbytes=event.nbytes,
                                          phase=event.phase, logits_scope=event.logits_scope))
        else:
            alloc = refs[index]
            alloc_tag = tags[alloc]
            if alloc_tag is None:
                target = (journal[alloc][1], -1)
            elif tag is None:
                raise NotReplicable("an untagged free of a layer's allocation")
            else:
                full = layer + (alloc_tag - tag)
                source = plan.source(full)
                target_index = alloc
                if source != alloc_tag:
                    if {source, alloc_tag} - _ALIKE:
                        raise NotReplicable("a free reaches a layer unlike its own")
                    target_index = by_layer[source][positions[alloc]]
                    if journal[target_index][0] != "a":
                        raise NotReplicable("a free does not find its allocation's copy")
                target = (journal[target_index][1], full)
            key = copies.get(target)
            if key is None or key in freed:
                raise NotReplicable("a free does not find its allocation's copy")
            freed.add(key)
            new_events.append(MemoryEvent(t=float(ticks), key=key, nbytes=event.nbytes,
                                          phase=event.phase, logits_scope=event.logits_scope))

    gradients = _gradients(rec, event_copies, new_events)
    by_module: dict[str, int] = {}
    module_tags = [layers.of(p) for p in rec.by_module]
    for path, shift in expand_runs(list(rec.by_module), module_tags, plan):
        by_module[layers.rename(path, shift)] = rec.by_module[path]
    kinds_in = list(rec.kinds)
    kinds = {layers.rename(path, shift): rec.kinds[path] for path, shift in
             expand_runs(kinds_in, [layers.of(p) for p in kinds_in], plan)}
    containers = {layers.rename(path, shift) for path, shift in expand_runs(
        sorted(rec.containers), [layers.of(p) for p in sorted(rec.containers)], plan)}
    static = [(-(i + 1), nbytes, category, layers.rename(owner, shift))
              for i, ((_, nbytes, category, owner), shift) in enumerate(expand_runs(
                  rec.static, [layers.of(s[3]) for s in rec.static], plan))]
    trainable = [(layers.rename(o, s), n) for (o, n), s in expand_runs(
        rec.trainable, [layers.of(o) for o, _ in rec.trainable], plan)]
    paged = [(layers.rename(o, s), n) for (o, n), s in expand_runs(
        rec.paged, [layers.of(o) for o, _ in rec.paged], plan)]
    return Recording(new_ops, new_events, saved, gradients, by_module, kinds, containers,
                     static, trainable, paged)


def _tag(journal: list, rec: Recording, layers: _Layers
         ) -> tuple[list[int | None], dict[int, tuple]]:
    """Each journal entry's layer (see the module docstring), and for each op across layers
    (by journal index) the layers and bytes of its input and output tensors."""
    tag_of_key: dict[int, int | None] = {key: layers.of(owner)
                                         for key, _, _, owner in rec.static}
    tags: list[int | None] = []
    spans: dict[int, tuple] = {}
    out_tags: dict[int, int | None] = {}
    for index, entry in enumerate(journal):
        kind = entry[0]
        if kind == "d":
            _, scope, op, in_keys, out_keys, _, nbytes, _, outputs = entry
            tag = layers.of(scope)
            out_tags = dict.fromkeys(out_keys)
            if tag is None:
                in_tags = [tag_of_key.get(k) for k in in_keys]
                found = {t for t in in_tags if t is not None}
                if len(found) == 1:
                    tag = found.pop()
                elif len(found) > 1:
                    if op >= 0 and rec.ops[op]["flops"]:
                        raise NotReplicable(f"{rec.ops[op]['name']} spans layers with FLOPs")
                    out_tags = _positional_tags(entry, tag_of_key)
                    spans[index] = (in_tags, nbytes[0],
                                    [out_tags[k] if k in out_tags else tag_of_key.get(k)
                                     for k in outputs], nbytes[1])
            if tag is not None:
                out_tags = {k: tag for k in out_keys}
            tags.append(tag)
        elif kind == "a":
            event = rec.events[entry[1]]
            tag = layers.of(entry[2])
            if tag is None:
                if event.key not in out_tags:
                    raise NotReplicable("an allocation outside any op")
                tag = out_tags[event.key]
            tag_of_key[event.key] = tag
            tags.append(tag)
        else:
            event = rec.events[entry[1]]
            tag = layers.of(entry[2])
            if tag is None:
                tag = tag_of_key.get(event.key)
            tag_of_key.pop(event.key, None)
            tags.append(tag)
    return tags, spans


def _positional_tags(entry, tag_of_key) -> dict[int, int | None]:
    """A foreach op's outputs, tagged by their position in its list arguments."""
    _, _, _, _, out_keys, lists, _, out_list, _ = entry
    if not out_keys:
        return {}
    if not out_list:
        raise NotReplicable("an op across layers makes a tensor whose size depends on depth")
    same = [keys for keys in lists if len(keys) == len(out_keys)]
    if not same:
        raise NotReplicable("an op across layers with outputs unlike its lists")
    result = {}
    for i, key in enumerate(out_keys):
        found = [tag_of_key.get(keys[i]) for keys in same]
        found = [t for t in found if t is not None]
        result[key] = found[0] if found else None
    return result


def _scope(entry) -> str:
    return entry[1] if entry[0] == "d" else entry[2]


def _assign_glue(tags: list[int | None], scoped: list[bool], frees: list[bool]) -> None:
    """Entries outside every layer's scope that fall between two adjacent layers' entries join
    the earlier layer (the decoder freeing a layer's input after the next layer ran); after the
    last layer of a pass, the frees right after it of its own or its predecessor's
    allocations do (the last layer's input, freed once it ran)."""
    previous = None  # the last entry inside a layer's scope
    i = 0
    while i < len(tags):
        if scoped[i]:
            previous = i
            i += 1
            continue
        j = i
        while j < len(tags) and not scoped[j]:
            j += 1
        if previous is not None:
            layer = tags[previous]
            if j < len(tags) and abs(tags[j] - layer) == 1:
                for k in range(i, j):
                    tags[k] = layer
            else:
                for k in range(i, j):
                    if not frees[k] or tags[k] not in (layer - 1, layer):
                        break
                    tags[k] = layer
        i = j


def _references(journal: list, rec: Recording) -> dict[int, int]:
    """The journal index of the allocation each free frees (storage keys are reused)."""
    live: dict[int, int] = {}
    refs: dict[int, int] = {}
    for index, entry in enumerate(journal):
        if entry[0] == "a":
            live[rec.events[entry[1]].key] = index
        elif entry[0] == "f":
            key = rec.events[entry[1]].key
            if key not in live:
                raise NotReplicable("a free of a storage not allocated in the step")
            refs[index] = live.pop(key)
    return refs


def _positions(tags) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Each tagged entry's position within its layer's entries, and each layer's entries."""
    by_layer: dict[int, list[int]] = {}
    positions: dict[int, int] = {}
    for index, tag in enumerate(tags):
        if tag is not None:
            positions[index] = len(by_layer.setdefault(tag, []))
            by_layer[tag].append(index)
    if set(by_layer) != set(range(SHALLOW_DEPTH)):
        raise NotReplicable("not every layer shows in the step")
    return positions, by_layer


def _check_alike(journal, tags, refs, positions, by_layer, rec: Recording,
                 layers: _Layers) -> None:
    """NotReplicable unless layers MIDDLE-1, MIDDLE and MIDDLE+1 leave the same journal and no
    reference reaches beyond the next layer. Alike means: entry by entry the same (what each
    is, relative to its layer), and each free frees, in the same neighbour, the allocation at
    the same position of that neighbour's entries (or, where the neighbour is layer 0 or the
    last, one alike)."""

    def shape(index: int):
        entry, tag = journal[index], tags[index]
        if entry[0] == "d":
            op = entry[2]
            row = rec.ops[op] if op >= 0 else None
            scope = entry[1]
            scope_shift = (layers.of(scope) - tag) if layers.of(scope) is not None else None
            return ("d", layers.pattern.sub("#", scope or ""), scope_shift,
                    None if row is None else (row["name"], row["phase"], row["shapes"],
                                              row["dtype"], row["flops"], row["bytes"],
                                              row["adapter_branch"],
                                              layers.pattern.sub("#", row["module"])))
        event = rec.events[entry[1]]
        return (entry[0], event.nbytes, event.phase, event.logits_scope,
                entry[1] in rec.saved_events)

    def reference(index: int):
        alloc = refs.get(index)
        if alloc is None:
            return None
        if tags[alloc] is None:
            return ("untagged", alloc)
        delta = tags[alloc] - tags[index]
        if tags[alloc] in _ALIKE:
            return (delta, positions[alloc], shape(alloc))
        return (delta, None, shape(alloc))

    for index, alloc in refs.items():
        if tags[index] is not None and tags[alloc] is not None and \
                abs(tags[alloc] - tags[index]) > 1:
            raise NotReplicable(f"a free in {_scope(journal[index])} reaches beyond the next "
                                f"layer")
    middle = by_layer[MIDDLE]
    shapes = [shape(i) for i in middle]
    references = [reference(i) for i in middle]
    for layer in (MIDDLE - 1, MIDDLE + 1):
        entries = by_layer[layer]
        if [shape(i) for i in entries] != shapes:
            raise NotReplicable(f"layer {layer} does not do what layer {MIDDLE} does")
        for k, (mine, theirs) in enumerate(zip(references, (reference(i) for i in entries))):
            if mine == theirs:
                continue
            if mine is None or theirs is None or mine[0] != theirs[0] or \
                    mine[0] == "untagged" or mine[2] != theirs[2] or \
                    (mine[1] is not None and theirs[1] is not None):
                raise NotReplicable(f"layer {layer} frees unlike layer {MIDDLE} (in "
                                    f"{_scope(journal[entries[k]])})")


def _directions(tags) -> dict[int, bool]:
    """For the first entry of each run of MIDDLE entries: whether layers ascend around it."""
    runs = []
    i = 0
    while i < len(tags):
        j = i
        while j < len(tags) and tags[j] == tags[i]:
            j += 1
        runs.append((i, tags[i]))
        i = j
    tagged = [(start, tag) for start, tag in runs if tag is not None]
    direction = {}
    for k, (start, tag) in enumerate(tagged):
        if tag != MIDDLE:
            continue
        before = tagged[k - 1][1] if k > 0 else None
        after = tagged[k + 1][1] if k + 1 < len(tagged) else None
        up = before == MIDDLE - 1 or after == MIDDLE + 1
        down = before == MIDDLE + 1 or after == MIDDLE - 1
        if up == down:
            raise NotReplicable("the middle layer's entries have no direction")
        direction[start] = up
    return direction


def _extended(row: dict, element_tags: tuple, plan: _Plan) -> tuple[str, float]:
    """A foreach op's shapes and bytes at full depth: each run of the middle layer's tensors
    in its inputs repeated, and their bytes (inputs and outputs) counted once per copy."""
    import json

    in_tags, in_nbytes, out_tags, out_nbytes = element_tags
    shapes = json.loads(row["shapes"])
    new_shapes = []
    i = 0
    while i < len(shapes):
        if in_tags[i] == MIDDLE:
            j = i
            while j < len(shapes) and in_tags[j] == MIDDLE:
                j += 1
            new_shapes.extend(shapes[i:j] * (plan.extra + 1))
            i = j
        else:
            new_shapes.append(shapes[i])
            i += 1
    middle = sum(n for t, n in zip(in_tags, in_nbytes) if t == MIDDLE) + \
        sum(n for t, n in zip(out_tags, out_nbytes) if t == MIDDLE)
    name = row["name"]
    if "_foreach_" in name and name.endswith("_") and not out_tags:
        # an in-place foreach op also writes its first list back (simulate._written_in_place):
        # the middle layer's run of that list, the first run of middle tensors in its inputs
        start = in_tags.index(MIDDLE)
        end = start
        while end < len(in_tags) and in_tags[end] == MIDDLE:
            end += 1
        middle += sum(in_nbytes[start:end])
    return json.dumps(new_shapes), float(row["bytes"] + plan.extra * middle)


def _gradients(rec: Recording, event_copies: dict[int, list[int]],
               new_events: list) -> list[tuple[int, float]]:
    """The gradient snapshots at full depth: every copy of each gradient's allocation (keys
    are never reused at full depth, so any time after it will do)."""
    import bisect

    allocations: dict[int, list[tuple[float, int]]] = {}
    for i, e in enumerate(rec.events):
        if e.nbytes > 0:
            allocations.setdefault(e.key, []).append((e.t, i))
    found = []
    for key, t in rec.gradients:
        made = allocations.get(key, [])
        before = bisect.bisect_right(made, (t, len(rec.events))) - 1
        if before >= 0:
            for new in event_copies.get(made[before][1], []):
                found.append((new_events[new].key, float("inf")))
    return found
