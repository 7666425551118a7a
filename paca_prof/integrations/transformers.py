"""ProfilerCallback: paca_prof.profile() under HF Trainer (and TRL's SFTTrainer, a Trainer).

    from paca_prof.integrations.transformers import ProfilerCallback
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[ProfilerCallback("traces/my-run", warmup=1, active=3)])
    trainer.train()                      # the trace is written when the profiled step ends

The profile opens when training begins (with the model and the optimizer Trainer passes to its
callbacks; accelerate's optimizer wrapper is looked through), ends a step at each optimizer
step (on_step_end: gradient accumulation's micro-batches are one step), and closes when
training ends. Gradient checkpointing and mixed precision (Trainer's autocast) are seen as
they run and recorded in run.yaml's recipe.

Limits: one train() call per callback. A train() that stops before the profiled step raises
the profile's RuntimeError from on_train_end (nothing is written); one that fails with an
error never reaches on_train_end, so the reserved output's hidden staging folder stays until
the process ends (trace.Reservation's limit for a killed process).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from paca_prof.profiling import Profile, _script


class ProfilerCallback(TrainerCallback):
    """A TrainerCallback that profiles `active` optimizer steps after `warmup` ones into the
    trace folder `out` (see paca_prof.profile for the arguments and the trace). Arguments are
    checked here, and `out` again when training begins."""

    def __init__(self, out: str | Path, warmup: int = 1, active: int = 3,
                 name: str | None = None):
        from paca_prof.engines import check_out
        from torch import nn

        # A stand-in model checks the arguments now, before Trainer does any work.
        Profile(nn.Module(), out=out, warmup=warmup, active=active, name=name)
        check_out(Path(out))
        self.out, self.warmup, self.active, self.name = Path(out), warmup, active, name
        self.profile: Profile | None = None

    @property
    def path(self) -> Path | None:
        """The trace folder, once written."""
        return self.profile.path if self.profile is not None else None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.profile is not None:
            raise RuntimeError("a ProfilerCallback profiles one train() call; give another "
                               "train() a new ProfilerCallback (with a new out)")
        self.profile = Profile(model, optimizer, out=self.out, warmup=self.warmup,
                               active=self.active, name=self.name,
                               command=f"transformers.Trainer with ProfilerCallback in "
                                       f"{_script()}")
        self.profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.profile.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profile is not None:
            self.profile.__exit__(None, None, None)
