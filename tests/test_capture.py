"""Capture sees a plain training loop's phases, scopes and steps without being told them:
forward and backward from the module scopes and the autograd engine, the optimizer phase from
torch.optim's step pre- and post-hooks, and a step counter (issue 16's Capture session)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paca_prof.capture import Capture
from paca_prof.modules import OPTIMIZER, ROOT


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _record(capture: Capture) -> list[tuple]:
    log: list[tuple] = []
    capture.on_phase(start=lambda p: log.append(("start", p, capture.step_index,
                                                 capture.micro_batch)),
                     end=lambda p: log.append(("end", p)))
    capture.on_step(lambda index: log.append(("step", index)))
    return log


def test_a_loop_with_accumulation_shows_its_phases_micro_batches_and_steps():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    unwatched = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with Capture(model, optimizer) as capture:
        log = _record(capture)
        for _ in range(2):
            for _ in range(2):  # two micro-batches per step
                model(torch.randn(3, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            unwatched.step()  # another optimizer's step is not this session's
    def one_step(i):
        return [("start", "forward", i, 0), ("end", "forward"),
                ("start", "backward", i, 0), ("end", "backward"),
                ("start", "forward", i, 1), ("end", "forward"),
                ("start", "backward", i, 1), ("end", "backward"),
                ("start", "optimizer", i, 2), ("end", "optimizer"), ("step", i)]

    assert log == one_step(0) + one_step(1)
    assert capture.step_index == 2


def test_scopes_nest_in_forward_and_close_in_backward():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[tuple[str, str, str]] = []
    with Capture(model, optimizer) as capture:
        capture.on_scope(lambda path, phase: events.append(("enter", path, phase)),
                         lambda path, phase: events.append(("exit", path, phase)))
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    forward = [e for e in events if e[2] == "forward"]
    assert forward == [("enter", ROOT, "forward"),
                       ("enter", "0", "forward"), ("exit", "0", "forward"),
                       ("enter", "1", "forward"), ("exit", "1", "forward"),
                       ("enter", "2", "forward"), ("exit", "2", "forward"),
                       ("exit", ROOT, "forward")]
    backward = [e for e in events if e[2] == "backward"]
    for path in (ROOT, "0", "1", "2"):  # every module's backward opens once and closes once
        assert backward.count(("enter", path, "backward")) == 1
        assert backward.count(("exit", path, "backward")) == 1
        assert backward.index(("enter", path, "backward")) < backward.index(
            ("exit", path, "backward"))
    enters = [p for kind, p, _ in backward if kind == "enter"]
    assert enters.index("2") < enters.index("1") < enters.index("0")  # output side first
    assert events[-2:] == [("enter", OPTIMIZER, "optimizer"), ("exit", OPTIMIZER, "optimizer")]


def test_without_an_optimizer_a_backward_pass_ends_the_step_and_hooks_are_removed():
    model = _model()
    with Capture(model) as capture:
        log = _record(capture)
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
    assert [e for e in log if e[0] == "step"] == [("step", 0), ("step", 1), ("step", 2)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model(torch.randn(3, 4)).sum().backward()  # after the session: nothing recorded
    assert capture.step_index == 3 and len(log) == 3 * 5


def test_an_unknown_step_rule_is_refused():
    with pytest.raises(ValueError, match="steps must be one of"):
        Capture(_model(), steps="epoch")


def test_a_module_sharing_its_output_with_an_inner_one_keeps_the_inner_one_current():
    """The MLP returns down_proj's output: both backward scopes open on its gradient, and the
    ops that follow (down_proj's GEMMs) are down_proj's, as a measured run attributes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)))
    seen: list[tuple[str, str]] = []
    with Capture(model) as capture:
        capture.on_scope(lambda path, phase: phase == "backward" and seen.append(
            (path, capture.current)))
        model(torch.randn(3, 4)).sum().backward()
    # the root, "1" and "1.1" share one output: whichever opens, "1.1" stays the current scope
    assert [path for path, _ in seen[:3]] == ["1.1", "1", ROOT]
    assert [current for _, current in seen[:3]] == ["1.1", "1.1", "1.1"]
    assert ("0", "0") in seen
