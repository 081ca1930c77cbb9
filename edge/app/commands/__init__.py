"""Sub-commands of `edge`, one module per command family, and what they share."""

from __future__ import annotations

import json
from typing import Any

from edge.errors import EdgeError

# input shape (C, H, W) of each data set, so graphs can be built with no data on disk
IN_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


def parse_hparams(items: list[str]) -> dict[str, Any]:
    """`--hp key=value` options -> dict; values are JSON where they parse (`a,b,c` as the
    list [a, b, c]), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EdgeError(f"--hp expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            try:  # a comma list, e.g. pool=4,4,2: a JSON list without the brackets
                out[key] = json.loads(f"[{value}]") if "," in value else value
            except json.JSONDecodeError:
                out[key] = value
    return out
