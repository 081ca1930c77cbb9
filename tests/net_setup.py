"""Shared by the export, runner and bundle tests: the digits conv net with CLAPP++ and the
integer step's first state."""

from __future__ import annotations

import torch

from edge import rules
from edge.nets import fold_batchnorm, preset
from quant.integer import rule_state


def build(name: str = "digits", seed: int = 0):
    """(net, rule, params): `name` at width 1/4 on 8x8 inputs, BatchNorm folded, the rule's
    parameters drawn from the same generator."""
    net = preset(name, (1, 8, 8), 0.25)
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(seed)
    net, params = fold_batchnorm(net, net.init_params(gen))
    rule.check(net)
    params.update(rule.init(net, gen))
    return net, rule, params


def int_state(net, rule, plan, stores) -> dict[str, torch.Tensor]:
    """The integer step's first state: the counter and the rule's own."""
    return {"step": torch.zeros((), dtype=torch.int64),
            **rule_state(net, rule.integer_form(net), plan, stores)}
