"""Every model family of the training zoo exports with parity, its preprocessing inside the graph."""

from __future__ import annotations

import gc
import re

import numpy as np
import onnx
import pytest

from export.exporter import export
from export.source import Images, Source
from kos_core.artifact import ModelMetadata


def _family(name: str) -> str:
    """Zoo models of one architecture family share a family: mobilenet_v3_small and _large, densenet121 and 201."""
    from training.models import BACKBONES

    if name not in BACKBONES:
        return name
    return re.sub(r"(Small|Large|B\d+|(?<!V)\d+)$", "", BACKBONES[name].application)


def _representatives() -> list[str]:
    """The lightest zoo model of each family (the zoo lists the small variants first)."""
    from training.models import zoo

    chosen: dict[str, str] = {}
    for name in zoo():
        chosen.setdefault(_family(name), name)
    return list(chosen.values())


@pytest.mark.parametrize("name", _representatives())
def test_zoo_family_exports_with_parity_and_its_preprocessing(name, tmp_path):
    import keras

    from training.models import BACKBONES, zoo

    spec = zoo()[name]
    if name in BACKBONES:
        # The smallest input each backbone accepts keeps the conversion quick; random weights suffice for structure.
        side = BACKBONES[name].min_size
        shape, options = (side, side, 3), {"weights": None}
    else:
        shape, options = (*spec.default_size, 1 if spec.default_color_mode == "grayscale" else 3), {}
    keras.utils.set_random_seed(0)
    model = spec.build(shape, 4, **options)
    images = np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)
    source = Source(
        model=model,
        labels=["a", "b", "c", "d"],
        input_shape=shape,
        color_mode="grayscale" if shape[2] == 1 else "rgb",
        resize_method="bilinear",
        architecture=name,
        dataset="generated",
        source_run="untrained",
        held_out=Images(images, None, "generated images"),
    )
    # Random backbone weights may answer alike for every image: parity is then inconclusive, allowed
    # here since this test is about the graph's structure; the agreement itself must still hold.
    result = export(source, name, tmp_path / "models", progress=lambda _: None, allow_inconclusive_parity=True)

    assert result.parity.passed and result.parity.images == 8
    assert result.graph.preprocessing_kept, "the model's preprocessing must be in the exported graph"
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["probabilities"]
    meta = ModelMetadata.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    assert meta.architecture == name and meta.input_shape == shape
    del model, source, result, proto
    keras.backend.clear_session()
    gc.collect()
