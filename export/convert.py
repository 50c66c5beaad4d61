"""Keras to ONNX with tf2onnx, and the checks that the exported graph is the inference graph."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME

from .errors import ExportError

if TYPE_CHECKING:
    import keras
    import onnx


OPSET = 17
# Random ops in an ONNX graph mean a layer still behaves as in training.
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial", "Bernoulli"})
# Ops that arithmetic preprocessing (rescaling, mean/std, a backbone's preprocess_input) becomes.
ARITHMETIC_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
AUGMENTATION_LAYERS = frozenset({"RandAugment", "AugMix", "MixUp", "CutMix", "Solarization"})
PREPROCESSING_LAYERS = frozenset({"Rescaling", "Normalization"})
PREPROCESSING_PREFIX = "preprocess"


def _is_augmentation(layer) -> bool:
    """Keras's random image layers (RandomFlip, RandomRotation, RandomZoom, ...) and RandAugment-like ones."""
    name = type(layer).__name__
    return name.startswith("Random") or name in AUGMENTATION_LAYERS


def iter_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of the model, nested models included, depth first."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(iter_layers(layer))
    return found


def _is_identity_preprocessing(layer) -> bool:
    """A Rescaling that changes nothing leaves no node behind, and need not."""
    if type(layer).__name__ != "Rescaling":
        return False
    scale, offset = layer.get_config().get("scale"), layer.get_config().get("offset")
    return scale == 1.0 and offset == 0.0


def to_onnx(model: keras.Model, opset: int = OPSET) -> onnx.ModelProto:
    """The Keras model as an ONNX ModelProto: uint8 NHWC `image` in, float32 `probabilities` out."""
    import tensorflow as tf
    import tf2onnx

    if opset < OPSET:
        raise ExportError(f"opset {opset} is too old: use {OPSET} or newer")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"the model has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); an image classifier has one of each"
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (1, 3) or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        raise ExportError(f"the model's input {shape} is not an image batch (batch, height, width, 1 or 3) of fixed size")
    out_shape = tuple(model.outputs[0].shape)
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise ExportError(f"the model's output {out_shape} is not a batch of class probabilities (batch, classes)")
    spec = (tf.TensorSpec((None, *shape[1:]), tf.uint8, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image):
        # training=False: augmentation and dropout are identity at inference and leave the graph.
        return {OUTPUT_NAME: model(image, training=False)}

    # Tensors a layer computed once and captured (e.g. a Normalization's mean and variance built
    # from its weights) are not variables: tf2onnx would turn them into extra graph inputs.
    concrete = serve.get_concrete_function(*spec)
    captured = {
        placeholder.name: value.numpy()
        for placeholder, value in zip(concrete.inputs[len(spec) :], concrete.captured_inputs)
        if placeholder.dtype != tf.resource
    }
    with _quiet_optimizer_warnings():
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    _inline_captured_tensors(proto, captured)
    name_batch_dimension(proto)
    extra = [i.name for i in proto.graph.input if i.name != INPUT_NAME]
    if extra:
        raise ExportError(f"the converted graph needs inputs besides {INPUT_NAME!r}: {extra}")
    return proto


BATCH_DIMENSION = "batch"


def name_batch_dimension(proto: onnx.ModelProto) -> None:
    """Call the dynamic first dimension `batch` wherever it appears, instead of tf2onnx's `unk__105`."""
    graph = proto.graph
    first = graph.input[0].type.tensor_type.shape.dim[0]
    generated = first.dim_param
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if dims and (dims[0].dim_param == generated or (value in graph.output and not dims[0].HasField("dim_value"))):
            dims[0].dim_param = BATCH_DIMENSION


@contextmanager
def _quiet_optimizer_warnings() -> Iterator[None]:
    """Hide tf2onnx's tracebacks for graph optimisations it skips: harmless, and parity checks the result."""
    logger = logging.getLogger("tf2onnx.optimizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _inline_captured_tensors(proto: onnx.ModelProto, captured: dict) -> None:
    """Turn graph inputs that stand for captured constant tensors into initializers holding their values."""
    from onnx import numpy_helper

    for graph_input in list(proto.graph.input):
        if graph_input.name in captured:
            proto.graph.initializer.append(numpy_helper.from_array(captured[graph_input.name], graph_input.name))
            proto.graph.input.remove(graph_input)


def _scopes(node_name: str) -> set[str]:
    # tf2onnx keeps TensorFlow's name scopes, where Keras appends "_1", "_2" to each layer's name.
    return {re.sub(r"_\d+$", "", part) for part in node_name.split("/")}


@dataclass
class GraphReport:
    augmentation_removed: list[str] = field(default_factory=list)
    preprocessing_kept: list[str] = field(default_factory=list)
    # Batch normalisations after an activation, written as one BatchNormalization (export/fold.py).
    scale_shift_folded: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, list[str]]:
        return {
            "augmentation_removed": self.augmentation_removed,
            "preprocessing_kept": self.preprocessing_kept,
            "scale_shift_folded": self.scale_shift_folded,
        }


def _ops_before_first_weighted_op(proto: onnx.ModelProto) -> list[str]:
    """Op types on the way from the image input to the first Conv / MatMul / Gemm."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier, ops = set(), [INPUT_NAME], []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            ops.append(node.op_type)
            if node.op_type not in {"Conv", "MatMul", "Gemm", "ConvInteger", "MatMulInteger"}:
                frontier.extend(node.output)
    return ops


def check_graph(model: keras.Model, proto: onnx.ModelProto) -> GraphReport:
    """Refuse a graph where augmentation survived or preprocessing vanished; say which layers were checked."""
    ops = {node.op_type for node in proto.graph.node}
    random_ops = sorted(ops & RANDOM_OPS)
    if random_ops:
        raise ExportError(f"the exported graph still holds random ops {random_ops}: augmentation did not run in inference mode")
    scopes: set[str] = set()
    arithmetic_scopes: set[str] = set()
    for node in proto.graph.node:
        node_scopes = _scopes(node.name)
        scopes |= node_scopes
        if node.op_type in ARITHMETIC_OPS:
            arithmetic_scopes |= node_scopes
    report = GraphReport()
    layers = iter_layers(model)
    for layer in layers:
        if _is_augmentation(layer):
            if layer.name in scopes:
                raise ExportError(f"augmentation layer {layer.name!r} ({type(layer).__name__}) survived into the exported graph")
            report.augmentation_removed.append(layer.name)
        elif type(layer).__name__ in PREPROCESSING_LAYERS and not _is_identity_preprocessing(layer):
            if layer.name not in arithmetic_scopes:
                raise ExportError(
                    f"preprocessing layer {layer.name!r} ({type(layer).__name__}) left no arithmetic in the exported graph"
                )
            report.preprocessing_kept.append(layer.name)
        elif layer.name.startswith(PREPROCESSING_PREFIX) and layer.weights:
            # The zoo names other preprocessing it builds from ordinary layers (caffe's BGR mean
            # convolution) preprocess_*: it must have become nodes of its own.
            if layer.name not in scopes:
                raise ExportError(
                    f"preprocessing layer {layer.name!r} ({type(layer).__name__}) is missing from the exported graph"
                )
            report.preprocessing_kept.append(layer.name)
    if report.preprocessing_kept and not ARITHMETIC_OPS & set(_ops_before_first_weighted_op(proto)):
        raise ExportError("the exported graph feeds the image to its first layer without the model's preprocessing arithmetic")
    return report
