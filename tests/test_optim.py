"""The official optimiser set-up: detectron2's schedule as fractions of the run, its weight-decay groups.
(The groups of the full-size model are checked tensor by tensor against the official list in
tests/test_convert.py.)"""

import pytest
import torch
from torch import nn

from odise_pl.optim import WarmupMultiStepLR, param_groups, weight_decay_of


def schedule(max_steps: int):
    """The official schedule's multiplier for a run of ``max_steps`` steps."""
    return WarmupMultiStepLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), max_steps=max_steps
    ).multiplier


def test_official_schedule_on_92188_steps():
    # facts file: warm-up over ~250 iterations from x0.067, x0.1 at ~81,945 and ~88,774
    s = schedule(92188)
    assert s(0) == pytest.approx(0.067)
    assert s(125) == pytest.approx(0.067 + (1 - 0.067) * (125 / 92188) / (500 / 184375))
    assert s(249) < 1.0 and s(250) == 1.0
    assert s(81944) == 1.0 and s(81945) == pytest.approx(0.1)
    assert s(88773) == pytest.approx(0.1) and s(88774) == pytest.approx(0.01)
    assert s(92187) == pytest.approx(0.01)


def test_schedule_scales_with_the_run():
    # the same schedule over half the steps: every boundary at half the step
    half = schedule(46094)
    assert half(124) < 1.0 and half(125) == 1.0
    assert half(40972) == 1.0 and half(40973) == pytest.approx(0.1)


def test_scheduler_steps_the_learning_rate():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupMultiStepLR(
        opt, max_steps=10, num_updates=10, milestones=[5], values=[1.0, 0.5], warmup_length=2
    )
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.067, 0.5335, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5])
    state = sched.state_dict()  # the step count only: a resumed run takes the schedule from its config
    assert (
        state["last_epoch"] == 10 and "max_steps" not in state and state.get("lr_lambdas") in (None, [None])
    )


def test_weight_decay_groups_follow_detectron2():
    m = nn.Module()
    m.linear = nn.Linear(4, 4)
    m.norm = nn.LayerNorm(4)
    m.gn = nn.GroupNorm(2, 4)
    m.attn = nn.MultiheadAttention(4, 2)
    m.embed = nn.Embedding(3, 4)
    m.scale = nn.Parameter(torch.zeros(()))
    m.frozen = nn.Linear(2, 2).requires_grad_(False)
    decay = weight_decay_of(m, 0.05, 0.0, 0.0)
    assert decay == {
        "scale": 0.05,
        "linear.weight": 0.05,
        "linear.bias": 0.0,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "gn.weight": 0.0,
        "gn.bias": 0.0,
        "attn.in_proj_weight": 0.05,
        "attn.in_proj_bias": 0.05,  # not named "bias": decayed, as in the official groups
        "attn.out_proj.weight": 0.05,
        "attn.out_proj.bias": 0.0,
        "embed.weight": 0.05,
    }
    groups = param_groups(m)
    assert sum(len(g["params"]) for g in groups) == len(decay)
    default = [g for g in groups if "weight_decay" not in g]  # takes the optimiser's own decay
    assert len(default) == 1 and len(default[0]["params"]) == 6
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
