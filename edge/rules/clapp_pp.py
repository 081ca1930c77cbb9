"""CLAPP++ (arXiv 2601.21683): the contrastive hinge per block, with 2D spatial dependence.

For block l with output y, both views:
  z = avgpool_k(y) flattened to D = C * H' * W'     (k configurable; default: see `pool_kernel`)
  c = the other view's z, detached                  (context)
  L = bilinear hinge of z against c (see `edge.rules.hinge`), B: D x D, full or low rank.
Closed-form update: dL/dz from the hinge -> spread back over the k x k windows (the average
pool's adjoint) -> the block's own closed-form adjoint to its weights. Nothing reaches the
previous block.

With spatial dependence a full B is (C H' W')^2 per layer, about 201M parameters for the
paper's full-width VGG-6: `predictor="auto"` (the default) takes a rank-r factorisation
B = U V^T whenever that is smaller; `predictor="full"` keeps the paper's exact B. The default
rank 32 was chosen on CIFAR-10 (benchmarks/results/ablation): it learned as well as rank 64
there with half the predictor, which keeps the step within half of backprop's memory.
"""

from __future__ import annotations

from typing import Any

from edge.errors import EdgeError
from edge.rules.base import pool_kernel
from edge.rules.hinge import PREDICTORS, HingeRule


class ClappPP(HingeRule):
    name = "clapp++"
    description = (
        "CLAPP++: per-layer contrastive hinge with 2D spatial dependence (the paper's best)"
    )
    memory = "block input and output of both views, the pooled D-vectors, B (D x D or rank r)"
    terms = (("", "same"),)

    def __init__(
        self, pool: int | list[int] | None = None, predictor: str = "auto",
        rank: int = HingeRule.rank, negatives: int = 0,
    ):
        if predictor not in PREDICTORS:
            raise EdgeError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
        if rank < 1:
            raise EdgeError(f"predictor rank must be positive, got {rank}")
        self.pool, self.predictor, self.rank = pool, predictor, rank
        self._set_negatives(negatives)

    def hparams(self) -> dict[str, Any]:
        return {"pool": self.pool, "predictor": self.predictor, "rank": self.rank,
                "negatives": self.negatives}

    def code_kernel(self, i, shape, n_blocks):
        k = self.pool
        if isinstance(k, list):
            if len(k) != n_blocks:
                raise EdgeError(f"--pool lists {len(k)} kernels for {n_blocks} layers")
            k = k[i]
        return pool_kernel(k, shape, i)
