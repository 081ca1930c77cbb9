"""Training steps as ONNX graphs any inference runtime can execute, and what runs them.

    program        StepProgram: the traced arithmetic (fp32 = edge.step.local_step; integer
                   mode plugs in its own, see export.integer)
    trace          export_function: pure tensor function -> clean, standard-ops-only ONNX
    training_step  training_step(...) -> (ModelProto, Manifest): one whole local step
    layers         layer_step_graphs(...): one step graph per layer, chained y -> x
    inference      encoder_graph (fp32), quant_encoder + qcdq_graph / qonnx_graph (int8)
    manifest       TensorSpec, GraphIO, Manifest: names, shapes, dtypes, bindings; JSON
    runner         Runner (onnxruntime EPs | OpenVINO devices), OnnxStepper, make_stepper
    bundle         write_bundle / check_bundle: graphs + state.npz + manifest + standalone
    standalone     the bundle's train_with_onnxruntime.py (numpy + onnxruntime only)

Nothing is imported here: `import export.runner` and friends pull in only what they need.
"""
