"""CLAPP (Illing et al., NeurIPS 2021): the contrastive hinge per block on globally pooled codes.

For block l with output y (a C x H x W map, or a flat vector), both views:
  z = mean of y over its H x W positions: a C-vector (a flat output is used as it is)
  c = the other view's z, detached                     (context)
  L = bilinear hinge of z against c (see `edge.rules.hinge`), B: C x C, full.
Closed-form update: dL/dz from the hinge, spread evenly back over the H x W positions
(dL/dy = dL/dz / (H W) at every position: the global pool's adjoint), then through the
block's own adjoint to its parameters.

The global average pool throws away where things are: CLAPP++ (`edge.rules.clapp_pp`) keeps a
coarse spatial grid instead, which is what the paper's theory asks for.
"""

from __future__ import annotations

from edge.rules.hinge import HingeRule


class Clapp(HingeRule):
    name = "clapp"
    description = "CLAPP (2021): per-layer contrastive hinge on globally average-pooled channels"
    memory = "block input and output of both views, two C-vectors, B (C x C)"
    terms = (("", "same"),)
    predictor = "full"

    def __init__(self, negatives: int = 0):
        self._set_negatives(negatives)

    def hparams(self):
        return {"negatives": self.negatives}

    def code_kernel(self, i, shape, n_blocks):
        return None
