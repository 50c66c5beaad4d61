"""What starting the service does to the whole process, once, before the app is built.

Kept out of the app factory so that building an app (in a test, say) changes nothing global.
"""

from __future__ import annotations

import logging

import onnxruntime as ort

from kos_core.imaging import allow_images_up_to, jpeg_decoder

from .runtime import Device, resolve_device
from .settings import Settings

log = logging.getLogger(__name__)

# onnxruntime's own log: warnings and errors only (its info lines are per-session chatter).
ORT_LOG_SEVERITY = 2


def prepare_process(settings: Settings) -> Device:
    """Set Pillow's pixel limit and onnxruntime's log level, probe the device and the JPEG decoder; raises DeviceUnavailable."""
    allow_images_up_to(settings.max_image_pixels)
    ort.set_default_logger_severity(ORT_LOG_SEVERITY)
    device = resolve_device(settings.device)
    # A GPU that CUDA cannot use is worth a warning; on auto, a machine without one is the normal CPU case.
    (log.warning if device.worrying else log.info)("%s", device.reason)
    # The decoders' agreement is checked here, before the first request rather than during it.
    log.info("plain JPEGs decode with %s", jpeg_decoder())
    return device
