"""Benchmarks of edge; shared helpers for what every result records about where it came from.

    machine()          this machine and its software (platform, CPUs, torch, onnxruntime, ...)
    code_state()       the git commit, whether the tree differs from it, and a digest of the code
    provenance(t0)     both, plus the date and the seconds since t0: stamped on every section
    run_id()           a name for this run (UTC date-time and the code digest's first 8 hex)

A section's provenance is written when it is measured and never rewritten: a result file
that keeps a section from an earlier run says so (`benchmarks.__main__`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("edge", "export", "quant", "targets", "benchmarks")


def machine() -> dict:
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_DIGEST: list[str] = []


def code_digest() -> str:
    """sha256 over the path and bytes of every .py file of the packages (CODE_DIRS), read
    once per process (at its first call, near its start: files edited while it runs do not
    change it): two runs with the same digest ran the same code, committed or not."""
    if _DIGEST:
        return _DIGEST[0]
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    _DIGEST.append(h.hexdigest())
    return _DIGEST[0]


def code_state() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_DIRS)
    return {"commit": _git("rev-parse", "HEAD"),
            "tree_modified": None if status is None else bool(status),
            "code_digest": code_digest()}


_RUN: dict = {}


def run_id() -> str:
    """This process's run: the UTC time it first asked and the code digest's first 8 hex."""
    if not _RUN:
        _RUN["id"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + code_digest()[:8]
    return _RUN["id"]


def provenance(t0: float | None = None) -> dict:
    """Where and when a figure was measured (stamped once, when it is measured)."""
    out = {"run": run_id(), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine(), **code_state()}
    if t0 is not None:
        out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
