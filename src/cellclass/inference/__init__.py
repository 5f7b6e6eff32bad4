"""Inference: everything that turns a checkpoint into decisions.

Modules:
    checkpoint: the typed, versioned :class:`~cellclass.inference.checkpoint.Checkpoint`,
        saved and loaded in one place.
    probabilities: logits to probabilities (softmax or sigmoid, by task type).
    predictor: the :class:`~cellclass.inference.predictor.Predictor`, from raw images to
        probabilities and labels (with D4 test-time augmentation when asked).
    onnx: ONNX export of a network, and ONNX Runtime as a predictor backend.
"""
