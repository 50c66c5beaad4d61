"""The one error the exporter raises: a refusal that leaves the repository untouched."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export was refused; nothing was written to the repository."""
