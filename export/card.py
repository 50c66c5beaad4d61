"""The human model card: what a repository model is, where it came from, and how it was verified."""

from __future__ import annotations

from pathlib import Path

from kos_core.artifact import MODEL_FILENAME, PRECISION_FILENAMES, ModelMetadata
from kos_core.layout import is_version, list_versions

from .errors import ExportError


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def read_metadata(model_file: Path) -> ModelMetadata:
    """The metadata inside an ONNX file, through the schema the service reads."""
    import onnx

    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{model_file} is not a readable ONNX model: {exc}") from None
    try:
        return ModelMetadata.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    except ValueError as exc:
        raise ExportError(f"{model_file}: {exc}") from None


def resolve_model_file(path: Path) -> Path:
    """An ONNX file, a version folder, or a model folder (its highest version)."""
    if path.is_file():
        return path
    if (path / MODEL_FILENAME).is_file():
        return path / MODEL_FILENAME
    if path.is_dir():
        versions = list_versions(path.parent, path.name)
        if versions:
            return path / str(versions[-1]) / MODEL_FILENAME
    raise ExportError(
        f"{path} is not a repository model: give <repository>/<name>/<version>, <repository>/<name> or a .onnx file"
    )


def model_card(meta: ModelMetadata, model_file: Path | None = None) -> str:
    """A few lines a person reads to know what this model is and whether to trust it."""
    where = f"  {model_file}, {_size(model_file)}" if model_file is not None and model_file.is_file() else ""
    version = f" v{model_file.parent.name}" if model_file is not None and is_version(model_file.parent.name) else ""
    labels = ", ".join(meta.labels[:10]) + (
        f", ... ({len(meta.labels)} classes)" if len(meta.labels) > 10 else f" ({len(meta.labels)} classes)"
    )
    metrics = ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in sorted(meta.metrics.items())) or "none recorded"
    lines = [
        f"model card: {meta.name}{version} ({meta.precision}){where}",
        f"  model      {meta.architecture} trained on {meta.dataset}; source {meta.source_run or 'unknown'}",
        f"  input      uint8 {meta.height}x{meta.width}x{meta.channels} {meta.color_mode}, resized {meta.resize_method}",
        f"  labels     {labels}",
        f"  test       {metrics}",
    ]
    p = meta.parity
    if p:
        agreed = p.get("agreed", p.get("passed"))  # files written before "agreed" existed said it in "passed"
        verdict = "passed" if agreed else "FAILED"
        if agreed and p.get("conclusive") is False:
            verdict = f"{p.get('verdict')} (exported with --allow-inconclusive-parity), agreement"
        spread = f", answers spread {float(p['output_spread']):.1e} across images" if "output_spread" in p else ""
        lines.append(
            f"  parity     {verdict} on {p.get('images')} held-out images: max |prob diff| {float(p.get('max_abs_difference', 0)):.2e} "
            f"(limit {float(p.get('threshold', 1e-4)):.0e}), top-1 agreement {100 * float(p.get('top1_agreement', 0)):.2f}%{spread}"
        )
    if meta.graph_checks:
        removed = ", ".join(meta.graph_checks.get("augmentation_removed", [])) or "none in the model"
        kept = ", ".join(meta.graph_checks.get("preprocessing_kept", [])) or "none in the model"
        lines.append(f"  graph      augmentation removed: {removed}; preprocessing kept: {kept}")
        folded = meta.graph_checks.get("scale_shift_folded")
        if folded:
            lines.append(f"  graph      {len(folded)} scale-and-shift pairs written as BatchNormalization: {', '.join(folded)}")
    for precision, v in meta.variants.items():
        file = model_file.parent / PRECISION_FILENAMES[precision] if model_file is not None else None
        size = f", {_size(file)}" if file is not None and file.is_file() else ""
        forced = " (forced)" if v.get("forced") and not v.get("passed") else ""
        lines.append(
            f"  variant    {precision}{size}: accuracy {float(v['accuracy']):.4f} vs float32 {float(v['float32_accuracy']):.4f} "
            f"({100 * (float(v['accuracy']) - float(v['float32_accuracy'])):+.2f} pt, against {v.get('against')}), top-1 agreement "
            f"{100 * float(v['top1_agreement']):.2f}%{forced}"
        )
    tools = ", ".join(f"{k} {v}" for k, v in meta.versions.items())
    opset = f", opset {meta.opset}" if meta.opset else ""
    lines.append(f"  built      {meta.created_at:%Y-%m-%d %H:%M:%S %Z} with {tools}{opset}")
    return "\n".join(lines)


def show(path: Path) -> str:
    """The model card of a repository model."""
    model_file = resolve_model_file(path)
    return model_card(read_metadata(model_file), model_file)
