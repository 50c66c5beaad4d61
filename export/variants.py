"""Reduced-precision variants of an exported graph: float16 weights for GPUs, int8 for CPUs."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kos_core.artifact import INPUT_NAME

from .errors import ExportError

if TYPE_CHECKING:
    import onnx


VARIANTS = ("float16", "int8")
CALIBRATION_IMAGES = 200


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and arithmetic; `image` stays uint8 and `probabilities` float32 for the service."""
    from onnxconverter_common import float16

    # keep_io_types: the graph's inputs and outputs keep their types, so callers see no difference.
    # Cast stays as it is: the converter retypes a Cast's output to float16 but not its `to`
    # attribute, which onnxruntime rejects; kept, it gets a float32-to-float16 Cast after it instead.
    with warnings.catch_warnings():
        # Weights below float16's range are clamped, with one warning each; the accuracy check judges the result.
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"])


class _ImageReader:
    """onnxruntime's CalibrationDataReader over uint8 images, a batch at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # part of the reader protocol; calibration reads once
        pass


def to_int8(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on training images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("int8 calibration needs training images, and there are none")
    # The quantiser works on files: keep them in a scratch folder, never in the repository.
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        folder = Path(scratch)
        onnx.save(proto, folder / "float32.onnx")
        try:
            # Shape inference and graph clean-up first, as onnxruntime recommends before quantising.
            quant_pre_process(str(folder / "float32.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True)
            prepared = folder / "prepared.onnx"
        except Exception:  # pre-processing is an optimisation; quantise the graph as it is if it fails
            prepared = folder / "float32.onnx"
        quantize_static(
            str(prepared),
            str(folder / "int8.onnx"),
            _ImageReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(folder / "int8.onnx")


def make_variant(precision: str, proto: onnx.ModelProto, calibration: np.ndarray | None = None) -> onnx.ModelProto:
    if precision == "float16":
        return to_float16(proto)
    if precision == "int8":
        if calibration is None:
            raise ExportError("the int8 variant needs calibration images")
        return to_int8(proto, calibration)
    raise ExportError(f"unknown variant {precision!r}; choose from {', '.join(VARIANTS)}")
