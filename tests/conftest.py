"""Every test starts from the same global random state, so a test that draws with torch's or
NumPy's global generator sees the same numbers whatever ran before it (a CI run once failed
on a draw a local run never saw)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_generators() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
