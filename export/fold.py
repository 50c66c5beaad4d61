"""One graph rewrite after tf2onnx: a per-channel scale then shift becomes one depthwise 1x1 convolution.

Keras' batch normalisation placed after an activation (Conv → ReLU → BatchNormalization, the
classic small CNNs of the zoo) reaches ONNX as `Mul` by a (1, C, 1, 1) constant and then `Add` of
another: tf2onnx cannot fold them into the convolution before the ReLU. onnxruntime's CPU
optimiser turns the `Mul` into a depthwise convolution in its blocked (NCHWc) layout, but not the
`Add`, so every such layer converts the whole activation out of that layout and back: on the
zoo's CIFAR-10 CNN those conversions cost about a tenth of the model's time. The same arithmetic
as one `Conv` (weight = scale, bias = shift, one group per channel) stays in the blocked layout on
the CPU and is an ordinary convolution everywhere else (CUDA, TensorRT, int8 quantisation).

The result is `x * scale + shift` per element either way; the export's parity check against Keras
runs on the rewritten graph.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


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
    """Rewrite each float32 `Mul(x, scale)` → `Add(·, shift)` over channels of a 4-D tensor in place.

    Only where the `Mul`'s result feeds that `Add` alone, its input is not the sole output of a
    convolution (which onnxruntime folds the pair into itself), both operands are constants, at least one
    of them holds one value per channel (a scalar rescale of the image is left as it is) and `x`
    is known to be 4-D. Returns the Keras layers folded, in graph order.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
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

    def constant(name: str) -> np.ndarray | None:
        init = initializers.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(init)

    folded: list[str] = []
    replaced: dict[int, onnx.NodeProto] = {}  # id of the Mul → its Conv
    dropped: set[int] = set()  # ids of the Adds
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
        stem = f"{mul.name or mul.output[0]}/depthwise"
        weight = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float32).reshape(channels, 1, 1, 1)
        bias = np.broadcast_to(shift.reshape(-1), (channels,)).astype(np.float32)
        graph.initializer.extend([numpy_helper.from_array(weight, f"{stem}/W"), numpy_helper.from_array(bias, f"{stem}/B")])
        replaced[id(mul)] = helper.make_node(
            "Conv", [x, f"{stem}/W", f"{stem}/B"], [add.output[0]], name=stem, group=channels, kernel_shape=[1, 1]
        )
        dropped.add(id(add))
        folded.append(_layer(mul.name))
    if not folded:
        return []
    # The Conv takes the Mul's place: its input is ready there, and everything reading the Add's
    # output came after the Add.
    rewritten = [replaced.get(id(node), node) for node in nodes if id(node) not in dropped]
    gone = {node.output[0] for node in nodes if id(node) in replaced}
    del graph.node[:]
    graph.node.extend(rewritten)
    info = [value for value in graph.value_info if value.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(proto)
    return folded
