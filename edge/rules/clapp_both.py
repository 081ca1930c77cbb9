"""CLAPP++ with both targets (arXiv 2601.21683): same-block prediction plus direct feedback.

Block l carries two predictors and sums two bilinear hinges of its pooled code z_l:
  L = hinge(z_l against the other view's z_l, B^l)          (CLAPP++, D x D)
    + hinge(z_l against the other view's c_top, F^l)        (direct feedback, D x Dc)
The modulators, predictions and Hebbian terms simply add up: dL/dz = dL_same/dz + dL_fb/dz,
then one pass back through the code pooling and the block's adjoint. The context is the
top-block forward pass of `edge.rules.clapp_dfb`; like it, needs >= 2 blocks.
"""

from __future__ import annotations

from edge.rules.clapp_dfb import ClappDFB


class ClappBoth(ClappDFB):
    name = "clapp++both"
    description = "CLAPP++ same-layer hinge plus the direct-feedback hinge (two predictors a layer)"
    memory = (
        "block input and output of both views, the pooled D-vectors, both views' pooled top "
        "codes (Dc), B (D x D) and feedback B (D x Dc), each full or rank r"
    )
    terms = (("", "same"), ("fb.", "top"))
