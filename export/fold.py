"""One graph rewrite after tf2onnx: a per-channel scale then shift becomes one BatchNormalization.

Keras' batch normalisation placed after an activation (Conv → ReLU → BatchNormalization, the
classic small CNNs of the zoo) reaches ONNX as `Mul` by a (1, C, 1, 1) constant and then `Add` of
another: tf2onnx cannot fold them into the convolution before the ReLU. onnxruntime's CPU
optimiser turns the `Mul` into a depthwise convolution in its blocked (NCHWc) layout, but not the
`Add`, so every such layer converts the whole activation out of that layout and back: on the
zoo's CIFAR-10 CNN those conversions cost about a tenth of the model's time. Written as one
`BatchNormalization` (scale, shift, mean 0, variance 1, epsilon 0) the same arithmetic stays in
the blocked layout, and where there is no blocked layout it is one pass over the tensor instead of
two. It says what the layer is, to every runtime.

The result is `x * scale + shift` per element either way (onnxruntime's CPU kernel computes
exactly that with variance 1 and epsilon 0; cuDNN raises epsilon to its minimum of 1e-5, a
relative change of 5e-6); the export's parity check against Keras runs on the rewritten graph.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


def _channels(shape: tuple[int, ...], channels: int) -> bool:
    """Whether a constant of `shape` broadcasts against a rank-4 NCHW tensor along its channels only."""
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    return padded[0] == 1 and padded[2:] == (1, 1) and padded[1] in (1, channels)


def _layer(node_name: str) -> str:
    # tf2onnx keeps TensorFlow's scopes: "model_1/block1_bn1_1/batchnorm/mul_1" → "block1_bn1".
    parts = node_name.split("/")
    return re.sub(r"_\d+$", "", parts[1] if len(parts) > 2 else parts[0])


def fold_channel_affine(proto: onnx.ModelProto) -> list[str]:
    """Rewrite each float32 `Mul(x, scale)` → `Add(·, shift)` over channels of a 4-D tensor, in place.

    Only where the `Mul`'s result feeds that `Add` alone, its input is not the sole output of a
    convolution (which onnxruntime folds the pair into itself), both operands are constants (not
    graph inputs with defaults), at least one of them holds one value per channel (a scalar
    rescale of the image is left as it is) and `x` is known to be 4-D. A graph with subgraphs
    (If, Loop, Scan) is left as it is. Should the result fail onnx's checker, the graph is left as
    it was. Returns the Keras layers folded, in graph order.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    if any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for attribute in n.attribute
    ):
        return []
    inputs = {value.name for value in graph.input}
    initializers = {init.name: init for init in graph.initializer if init.name not in inputs}
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes: dict[str, list[int | None]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        tensor = value.type.tensor_type
        if tensor.elem_type == onnx.TensorProto.FLOAT and tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    nodes = list(graph.node)  # one Python object per node, for the identities below
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {value.name for value in graph.output}
    producers = {out: node for node in nodes for out in node.output}
    taken = {*initializers, *inputs, *producers, *(node.name for node in nodes)}

    def constant(name: str) -> np.ndarray | None:
        init = initializers.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(init)

    def fresh(name: str) -> str:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        return unique

    folded: list[str] = []
    replaced: dict[int, onnx.NodeProto] = {}  # id of the Mul → its BatchNormalization
    dropped: set[int] = set()  # ids of the Adds
    added: list[onnx.TensorProto] = []
    for add in nodes:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for i in (0, 1):
            mul, shift = producers.get(add.input[i]), constant(add.input[1 - i])
            if mul is not None and shift is not None:
                break
        else:
            continue
        if mul.op_type != "Mul" or id(mul) in replaced or consumers.get(mul.output[0]) != 1 or mul.output[0] in outputs:
            continue
        scales = [(constant(mul.input[j]), mul.input[1 - j]) for j in (0, 1)]
        scale, x = next(((s, x) for s, x in scales if s is not None), (None, None))
        shape = shapes.get(x) if x is not None else None
        if scale is None or shape is None or len(shape) != 4 or not shape[1]:
            continue
        source = producers.get(x)
        if source is not None and source.op_type == "Conv" and consumers.get(x) == 1:
            continue  # onnxruntime folds a scale and shift straight after a convolution into its weights
        channels = shape[1]
        if channels == 1 or not (_channels(scale.shape, channels) and _channels(shift.shape, channels)):
            continue
        if scale.size == 1 and shift.size == 1:
            continue  # a scalar affine (an image rescale), not a per-channel one
        stem = fresh(f"{mul.name or mul.output[0]}/batchnorm")
        values = {
            "scale": np.broadcast_to(scale.reshape(-1), (channels,)),
            "shift": np.broadcast_to(shift.reshape(-1), (channels,)),
            "mean": np.zeros(channels),
            "variance": np.ones(channels),
        }
        names = {key: fresh(f"{stem}/{key}") for key in values}
        added += [numpy_helper.from_array(values[key].astype(np.float32), names[key]) for key in values]
        replaced[id(mul)] = helper.make_node("BatchNormalization", [x, *names.values()], [add.output[0]], name=stem, epsilon=0.0)
        dropped.add(id(add))
        folded.append(_layer(mul.name))
    if not folded:
        return []
    # The BatchNormalization takes the Mul's place: its input is ready there, and everything
    # reading the Add's output came after the Add.
    original = proto.SerializeToString()
    rewritten = [replaced.get(id(node), node) for node in nodes if id(node) not in dropped]
    gone = {node.output[0] for node in nodes if id(node) in replaced}
    replaced_inputs = {name for node in nodes if id(node) in replaced or id(node) in dropped for name in node.input}
    del graph.node[:]
    graph.node.extend(rewritten)
    graph.initializer.extend(added)
    info = [value for value in graph.value_info if value.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    # Only the constants this rewrite left unread go; any other initializer stays as it was.
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in replaced_inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        log.warning("the scale-and-shift rewrite gave an invalid graph, so the graph stays as converted: %s", exc)
        proto.ParseFromString(original)
        return []
    return folded
