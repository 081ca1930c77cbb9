"""The rule registry: `get(name, **hparams)` and `describe()` for `edge rules`.

Local rules live one per file in this package; global backprop baselines in
`edge.baselines`. Classes are imported lazily so the baselines may import rules.
"""

from __future__ import annotations

from typing import Any

from edge.errors import EdgeError


def _classes() -> dict[str, type]:
    from edge.baselines.bp_clapp import BPClappPP
    from edge.baselines.bp_infonce import BPInfoNCE
    from edge.rules.clapp import Clapp
    from edge.rules.clapp_both import ClappBoth
    from edge.rules.clapp_dfb import ClappDFB
    from edge.rules.clapp_pp import ClappPP
    from edge.rules.ff import ForwardForward

    local = (Clapp, ClappPP, ClappDFB, ClappBoth, ForwardForward)
    return {c.name: c for c in (*local, BPInfoNCE, BPClappPP)}


def names() -> list[str]:
    return list(_classes())


def hparam_keys(name: str) -> list[str]:
    """The hyper-parameters rule `name` takes (its constructor's keyword arguments)."""
    import inspect

    cls = _classes()[name]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    keys = [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind in kinds]
    if name == "bp-clapp++":
        keys = hparam_keys("clapp++")
    return keys


def get(name: str, **hparams: Any):
    classes = _classes()
    if name not in classes:
        raise EdgeError(f"unknown rule {name!r}; valid: {', '.join(classes)}")
    valid = hparam_keys(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise EdgeError(f"rule {name!r} has no hyper-parameter {unknown[0]!r}; valid: "
                        f"{', '.join(valid) or 'none'}")
    try:
        return classes[name](**hparams)
    except TypeError as e:
        raise EdgeError(f"bad hyper-parameters for rule {name!r}: {e}") from None


def default_lr(name: str) -> float:
    """The rule's default AdamW learning rate (a class attribute of every rule)."""
    classes = _classes()
    if name not in classes:
        raise EdgeError(f"unknown rule {name!r}; valid: {', '.join(classes)}")
    return classes[name].default_lr


def describe() -> list[dict[str, Any]]:
    return [
        {"name": c.name, "description": c.description, "local": c.is_local, "memory": c.memory,
         "default_lr": c.default_lr}
        for c in _classes().values()
    ]
