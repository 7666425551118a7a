"""SavedTensorLedger: the bytes autograd saves for backward, charged to the module that saved them.

It uses torch.autograd.graph.saved_tensors_hooks to see every tensor saved for backward while a
Capture session is in its forward phase, and charges it to the innermost module running then,
once per storage, parameters and buffers excluded. Works on real devices and the meta device.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.autograd.graph import saved_tensors_hooks

from paca_prof.capture import Capture
from paca_prof.sharding import gathered_parameters


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage that works on every device, meta included."""
    return tensor.untyped_storage()._cdata


@dataclass
class _Saved:
    path: str
    nbytes: int
    ptr: int | None
    refs: list[weakref.ref]

    def alive(self) -> bool:
        return any(ref() is not None for ref in self.refs)


class SavedTensorLedger:
    """Bytes saved for backward, charged to the innermost module running when saved.

    Counts what is still saved when a forward phase ends: each storage once (views and
    repeated saves of one tensor cost nothing more), parameters and buffers excluded, and
    tensors saved by a graph that was dropped during forward (a result that was discarded, as
    DoRA's weight-norm branch) excluded. The pack hook returns the tensor itself, so a weak
    reference to it lives exactly as long as the saved entry. Results (`by_module`: path ->
    bytes, `keys`: storage key -> path, `ptr_owner`: data pointer -> path) are those of the
    latest forward phase (every micro-batch of a steady-state step saves the same).

    Limits: saves made outside the forward phase (gradient checkpointing's recompute in
    backward) are not counted: they are transient, and forward already counted what it kept.
    """

    def __init__(self, capture: Capture):
        self.capture = capture
        model = capture.model
        self.excluded = {storage_key(t) for t in model.parameters()}
        self.excluded |= {storage_key(t) for t in model.buffers()}
        self.by_module: dict[str, int] = {}
        self.keys: dict[int, str] = {}
        self.ptr_owner: dict[int, str] = {}
        self._saved: dict[int, _Saved] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda tensor: tensor)
        capture.on_phase(start=self._phase_start, end=self._phase_end)

    def __enter__(self) -> SavedTensorLedger:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total_bytes(self) -> int:
        return sum(self.by_module.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.capture.phase != "forward":
            return tensor
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return tensor
        entry = self._saved.get(key)
        if entry is not None and entry.alive():
            entry.refs.append(weakref.ref(tensor))
            return tensor
        # a new storage, or a dead one's key reused by a new storage
        ptr = storage.data_ptr() if tensor.device.type != "meta" else None
        self._saved[key] = _Saved(self.capture.current, storage.nbytes(), ptr,
                                  [weakref.ref(tensor)])
        return tensor

    def _phase_start(self, phase: str) -> None:
        if phase == "forward":  # FSDP2's gathered parameters, made at a group's first forward
            self.excluded |= {storage_key(t) for t in gathered_parameters(self.capture.model)}

    def _phase_end(self, phase: str) -> None:
        if phase != "forward":
            return
        by_module: dict[str, int] = defaultdict(int)
        self.keys, self.ptr_owner = {}, {}
        for key, entry in self._saved.items():
            if entry.alive():
                by_module[entry.path] += entry.nbytes
                self.keys[key] = entry.path
                if entry.ptr is not None:
                    self.ptr_owner[entry.ptr] = entry.path
        self.by_module = dict(by_module)
        self._saved.clear()
