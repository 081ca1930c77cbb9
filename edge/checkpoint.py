"""Checkpoints: safetensors (no pickle) written atomically, plus the weights digest.

Layout: tensors `param/<name>` and `state/<name>`; the safetensors metadata holds one JSON
string under "edge" (config, network spec, epoch, history). A write goes to a temp file in
the same directory, is fsynced, then renamed over the old file, so a crash leaves either the
old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from edge.errors import EdgeError

FILENAME = "checkpoint.safetensors"


def save(path: Path, params: dict[str, Tensor], state: dict[str, Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    tensors.update({f"state/{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"edge": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise EdgeError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["edge"])
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise EdgeError(f"{path} is not an edge checkpoint ({type(e).__name__}: {e})") from None
    params = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    return params, state, meta


def weights_digest(params: dict[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(params):
        t = params[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
