"""CLAPP++ with direct feedback (arXiv 2601.21683): every block predicts the top block.

Before the step, `context` runs both views forward to the top block with the current weights
(a forward pass only, nothing flows backward) and keeps the top block's pooled code:
  c_top = avgpool_k(top-block output) flattened to Dc        (detached)
Block l, with its own pooled code z (as in CLAPP++, D = C * H' * W'), scores its anchor
against the OTHER view's top-block code through its own feedback predictor B^l (D x Dc):
  u = z_l^T B^l c_top,      L = bilinear hinge of z_l against c_top (see `edge.rules.hinge`)
The three factors of the update are unchanged (modulator x prediction B^l c_top x Hebbian
term), only the prediction now comes from the top of the network: in a deep linear network
with an orthogonal downstream product and B^l at its optimum it is exactly the backprop
update of the top-layer loss (`edge.theory`). B^l is full or low rank as in CLAPP++.

The context is computed once per step from the incoming weights; the block-by-block loop then
updates the lower blocks before the upper ones run, so the top block scores its fresh code
against the slightly older context (on the top block this is CLAPP++ with a feedback B).
Needs >= 2 blocks: with one the feedback is the block itself, i.e. plain clapp++.
"""

from __future__ import annotations

from edge.rules.clapp_pp import ClappPP


class ClappDFB(ClappPP):
    name = "clapp++dfb"
    description = "CLAPP++ with direct feedback: each layer predicts the top layer's pooled code"
    memory = (
        "block input and output of both views, the pooled D-vectors, both views' pooled top "
        "codes (Dc), feedback B (D x Dc or rank r)"
    )
    terms = (("fb.", "top"),)
