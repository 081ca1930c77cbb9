"""Quantized on-device training: specs, Brevitas layers, the integer step and its reference.

spec.py        QuantSpec, quantize / dequantize (round half to even), power-of-two scales
intops.py      the integer primitives: floor/round/stochastic shifts, saturation, exact
               8-bit products; custom ops, exact chunked float32 in eager torch and
               Mod/Div floors, MatMulInteger, ConvInteger in ONNX
layers.py      Brevitas encoders (fixed-point quantizers, frozen scales, QCDQ export)
plan.py        QuantPlan: every exponent, bit width, range and shift of a run
calibrate.py   float params + a few batches -> plan + integer params
integer.py     integer_step: the training step in integer arithmetic
clapp_int.py   the CLAPP family's integer hinge (clapp, clapp++, clapp++dfb, clapp++both)
reference.py   the same step in NumPy int64, written independently (bit-exact oracle)
qat.py         qat_step: fp32 latent weights, quantized forward, any local rule
train.py       the API the training loop calls (init_quant, quant_step, ...)
"""
