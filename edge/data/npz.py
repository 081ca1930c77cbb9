"""Reading .npz archives without pickles, with numpy's errors rephrased as one line."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edge.data.dataset import SPLITS
from edge.errors import EdgeError


def read_npz(path: Path, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays x_train, y_train, x_test, y_test (and any of ``optional`` present)."""
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError):
        raise EdgeError(f"{path}: not a NumPy .npz archive (want a zip of .npy arrays, as "
                        "numpy.savez writes)") from None
    except OSError as e:
        raise EdgeError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise EdgeError(f"{path}: holds a single .npy array; want an .npz with arrays "
                        f"{', '.join(SPLITS)} (numpy.savez)")
    with z:
        missing = [k for k in SPLITS if k not in z.files]
        if missing:
            raise EdgeError(f"{path}: lacks arrays {missing}; it holds {sorted(z.files)}")
        out = {}
        for k in (*SPLITS, *(k for k in optional if k in z.files)):
            try:
                out[k] = z[k]
            except ValueError as e:
                why = ("holds object (pickled) data; store numeric arrays"
                       if "bject" in str(e) else "is not a valid .npy array")
                raise EdgeError(f"{path}: {k}: {why}") from None
            except (OSError, EOFError, zipfile.BadZipFile):
                raise EdgeError(f"{path}: {k}: corrupt or truncated member") from None
    return out
