"""The one error type of the training tools: bad input or a missing resource, said plainly."""

from __future__ import annotations


class TrainingError(ValueError):
    """A run could not start or finish for a reason the user can fix; the message says how."""
