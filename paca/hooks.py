"""One global torch.optim step post hook that tells PaCA layers their trained columns changed.

PacaLinear writes its columns into the weight right after every optimizer step that updated
them, so that any read of the weight (a forward, state_dict(), a checkpoint) sees that step.
The authors' layer (paca/authors.py) only records that its columns went stale. Both subscribe
here. Fused optimizers (torch.optim.AdamW(fused=True), HF Trainer's default
"adamw_torch_fused") update parameters without bumping their version counter, which is why a
hook and not a version check decides.

Limits: only optimizers that subclass torch.optim.Optimizer call the hook (that includes
accelerate's and bitsandbytes' wrappers, which call an inner torch optimizer). Others must call
the layer's sync method themselves (see PacaLinear).
"""

from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

# Layers with an `_after_optimizer_step(stepped_ids)` method, in the order they subscribed (a
# weak-keyed dict keeps insertion order; a WeakSet iterates in address order, which would make
# the order of the column writes differ from run to run and from layer to layer).
_SUBSCRIBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def subscribe(layer) -> None:
    """Call layer._after_optimizer_step({id of each parameter the optimizer holds}) after every
    torch.optim step, for as long as the layer lives, layers in the order they subscribed (a
    model's in module order)."""
    _SUBSCRIBERS[layer] = None


def _after_step(optimizer, args, kwargs) -> None:
    if not _SUBSCRIBERS:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_SUBSCRIBERS):
        layer._after_optimizer_step(stepped)


register_optimizer_step_post_hook(_after_step)
