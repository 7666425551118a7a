"""paca_prof.simulate(): a user's own setup simulated on the meta device, as a Python API: the
same run as `paca-prof run --device meta --model ... --peft-config adapter_config.json`.

    import paca_prof
    analysis = paca_prof.simulate(model.config, model.peft_config["default"], seq=4096,
                                  batch=4, gpu="h100-80gb", grad_ckpt=True)
    analysis.summary()                   # simulated bytes, times projected onto the GPU

So a setup that runs on a small machine (profiled there with paca_prof.profile) can be planned
for a bigger GPU at full size, and the simulation compared with the measured run
(`paca-prof compare MEASURED SIMULATED`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path


def simulate(model_config, peft_config=None, *, seq: int, batch: int = 1,
             dtype: str = "bf16", methods=None, settings=None, gpu: str | None = "a100-80gb",
             headroom: str | None = None, out: str | Path | None = None, **recipe):
    """Simulate training steps of `model_config` and return the trace's TraceAnalysis.

    model_config: a transformers config (model.config), a mapping of its values, a preset name
        or a local config.json / model folder.
    peft_config: the user's LoRA adapter: a peft.LoraConfig, a mapping of its fields, or the
        path of an adapter_config.json (as save_pretrained writes it; regex or all-linear
        target_modules, rank_pattern and alpha_pattern included). Its method (lora, or dora
        with use_dora) is simulated with exactly that adapter.
    methods: the methods to simulate (default: the config's method, or the tool's default
        methods without one); the others use `settings` (a methods.MethodSettings) and the
        recipe's targets.
    gpu: project times onto this GPU (a name or a spec file) and mark a method whose peak
        exceeds its memory less `headroom` as oom; None: simulated bytes only.
    out: the trace folder (default: a new folder under the temp dir, kept: its path is
        analysis.trace.path).
    recipe: Recipe's fields (recipe.py: targets, attention, grad_ckpt, ...).

    ValueError (one line) for anything a `paca-prof run` would refuse.
    """
    from paca_prof import engines
    from paca_prof.analyze import TraceAnalysis
    from paca_prof.budget import DEFAULT_HEADROOM, make_budget
    from paca_prof.gpus import gpu_spec
    from paca_prof.methods import DEFAULT_METHODS, MethodSettings
    from paca_prof.methods import peft_config as peft_configs
    from paca_prof.recipe import Recipe
    from paca_prof.spec import RunSpec

    fields = None if peft_config is None else peft_configs.check(peft_config)
    if methods is None:
        methods = (peft_configs.method_of(fields),) if fields is not None else DEFAULT_METHODS
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}; the recipe has "
                         f"{', '.join(sorted(known))}")
    spec = RunSpec(model=model_config, seq=seq, batch=batch, dtype=dtype, device="meta",
                   methods=tuple(methods), settings=settings or MethodSettings(),
                   recipe=Recipe(**recipe), peft_config=fields)
    spec_gpu = gpu_spec(gpu) if gpu is not None else None
    budget = (make_budget(gpu=spec_gpu, headroom=headroom or DEFAULT_HEADROOM)
              if spec_gpu is not None else None)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="paca-prof-simulate-")) / "trace"
    command = f"paca_prof.simulate(seq={seq}, batch={batch}, dtype={dtype!r})"
    path = engines.run(spec, Path(out), command, gpu=spec_gpu, budget=budget)
    return TraceAnalysis(path)
