"""Errors of the shared core, free of any transport: each front end maps them to its own answer."""

from __future__ import annotations


class CoreError(ValueError):
    """Bad input the user can fix; the message says what and where."""


class ImageError(CoreError):
    """An image that cannot be used; the message names the file."""


class UnsupportedImage(ImageError):
    """Not an image, or a format that is not supported (HTTP maps it to 415)."""


class ImageTooLarge(ImageError):
    """More pixels than the limit allows, or than a request's budget leaves (HTTP maps it to 413)."""


class ImageFolderError(CoreError):
    """An image folder that is not laid out as <root>/<class>/<images>, or holds nothing usable."""
