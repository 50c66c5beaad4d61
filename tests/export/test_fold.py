"""The scale-and-shift fold on hand-built graphs: the same answers, and only where it is exact and useful."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fold import fold_channel_affine

C = 4


def _graph(scale: np.ndarray, shift: np.ndarray, *, producer: str = "Relu", mul_outputs: int = 1, swap: bool = False):
    """x (N, 3, 6, 6) → Conv 3→C → [Relu] → Mul(scale) → Add(shift) → Conv C→2 (padded) → output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(C, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(2, C, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(scale.astype(np.float32), "scale"),
        numpy_helper.from_array(shift.astype(np.float32), "shift"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="m/conv1/Conv", pads=[1, 1, 1, 1])]
    before = "c1"
    if producer == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["r"], name="m/conv1_1/Relu"))
        before = "r"
    mul_inputs = ["scale", before] if swap else [before, "scale"]
    nodes += [
        helper.make_node("Mul", mul_inputs, ["m1"], name="m/bn_1/batchnorm/mul_1"),
        helper.make_node("Add", ["shift", "m1"] if swap else ["m1", "shift"], ["a1"], name="m/bn_1/batchnorm/add_1"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="m/conv2/Conv", pads=[1, 1, 1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 6, 6])]
    if mul_outputs == 2:
        outputs.append(helper.make_tensor_value_info("m1", TensorProto.FLOAT, ["batch", C, 6, 6]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


PER_CHANNEL = np.array([0.5, 2.0, -1.5, 3.0]).reshape(1, C, 1, 1)
SHIFT = np.array([0.1, -0.2, 0.3, -0.4]).reshape(1, C, 1, 1)


@pytest.mark.parametrize(
    ("scale", "shift", "swap"),
    [
        (PER_CHANNEL, SHIFT, False),
        (PER_CHANNEL, SHIFT, True),  # constants on the left of Mul and Add
        (PER_CHANNEL.reshape(C, 1, 1), np.array(0.25), False),  # (C, 1, 1) scale, scalar shift
        (np.array(2.0), SHIFT, False),  # scalar scale, per-channel shift
    ],
)
def test_a_per_channel_scale_and_shift_becomes_one_batch_normalization_with_the_same_answers(scale, shift, swap):
    proto = _graph(scale, shift, swap=swap)
    x = np.random.default_rng(1).normal(size=(3, 3, 6, 6)).astype(np.float32)
    expected = _run(proto, x)

    assert fold_channel_affine(proto) == ["bn"]

    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Conv", "Relu", "BatchNormalization", "Conv"]
    norm = proto.graph.node[2]
    assert norm.name == "m/bn_1/batchnorm/mul_1/batchnorm" and list(norm.input)[0] == "r" and list(norm.output) == ["a1"]
    assert {a.name: helper.get_attribute_value(a) for a in norm.attribute} == {"epsilon": 0.0}
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert set(values) == {"w1", "w2", *norm.input[1:]}, "the old constants are gone"
    scale_, shift_, mean, variance = (values[name] for name in norm.input[1:])
    np.testing.assert_array_equal(scale_, np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (C,)))
    np.testing.assert_array_equal(shift_, np.broadcast_to(np.asarray(shift, np.float32).reshape(-1), (C,)))
    assert not mean.any() and (variance == 1).all()
    # x * scale + shift exactly: the same float32 operations as Mul then Add.
    np.testing.assert_array_equal(_run(proto, x), expected)


@pytest.mark.parametrize(
    ("case", "graph"),
    [
        ("a scalar rescale", lambda: _graph(np.array(2.0), np.array(0.5))),
        ("right after a convolution, which onnxruntime folds itself", lambda: _graph(PER_CHANNEL, SHIFT, producer="Conv")),
        ("the Mul's result is also an output", lambda: _graph(PER_CHANNEL, SHIFT, mul_outputs=2)),
        ("constants along the last axis (NHWC)", lambda: _graph(np.ones((1, 1, 1, C)), np.ones((1, 1, 1, C)))),
    ],
)
def test_left_alone_where_folding_is_not_exact_or_not_useful(case, graph):
    proto = graph()
    before = proto.SerializeToString()
    assert fold_channel_affine(proto) == [], case
    assert proto.SerializeToString() == before, case


def test_a_tensor_of_unknown_rank_is_left_alone():
    proto = _graph(PER_CHANNEL, SHIFT)
    # Without a shape on the input, shape inference cannot tell the Mul's input is 4-D.
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    assert fold_channel_affine(proto) == []


def test_a_graph_with_subgraphs_is_left_alone():
    proto = _graph(PER_CHANNEL, SHIFT)
    # A Loop whose body reads the Mul's output: the Mul must not go away under it.
    body = helper.make_graph(
        [helper.make_node("Identity", ["m1"], ["out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        ],
    )
    body.node.insert(0, helper.make_node("Identity", ["c"], ["c_out"]))
    proto.graph.node.append(helper.make_node("Loop", ["", ""], ["scan"], body=body))
    before = proto.SerializeToString()
    assert fold_channel_affine(proto) == []
    assert proto.SerializeToString() == before


def test_new_names_never_clash_and_unrelated_initializers_stay():
    proto = _graph(PER_CHANNEL, SHIFT)
    taken = "m/bn_1/batchnorm/mul_1/batchnorm"
    proto.graph.initializer.extend(
        [numpy_helper.from_array(np.zeros(1, np.float32), taken), numpy_helper.from_array(np.ones(2, np.float32), "unused")]
    )
    x = np.random.default_rng(2).normal(size=(2, 3, 6, 6)).astype(np.float32)
    expected = _run(proto, x)
    assert fold_channel_affine(proto) == ["bn"]
    norm = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    assert norm.name != taken and not set(norm.input[1:]) & {taken, "unused"}
    assert {"unused", taken} <= {i.name for i in proto.graph.initializer}, "what the rewrite did not touch stays"
    np.testing.assert_array_equal(_run(proto, x), expected)


def test_constants_that_are_also_graph_inputs_are_not_constants():
    proto = _graph(PER_CHANNEL, SHIFT)
    # An initializer listed as a graph input is only a default: a caller may feed another scale.
    proto.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, C, 1, 1]))
    before = proto.SerializeToString()
    assert fold_channel_affine(proto) == []
    assert proto.SerializeToString() == before


def test_a_result_the_checker_refuses_leaves_the_graph_as_converted(monkeypatch, caplog):
    proto = _graph(PER_CHANNEL, SHIFT)
    before = proto.SerializeToString()

    def refuse(model):
        raise onnx.checker.ValidationError("refused for the test")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    assert fold_channel_affine(proto) == []
    assert proto.SerializeToString() == before
    assert "graph stays as converted" in caplog.text
