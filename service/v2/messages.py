"""The protocol's gRPC messages, from the compiled descriptor set beside Triton's .proto files (proto/README.md).

They live in a descriptor pool of their own rather than protobuf's default one, where generated
modules register: tritonclient's own generated copy of the same package (`inference`) may be
imported by the same process, and the two must not collide.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "inference.GRPCInferenceService"
_DESCRIPTORS = "inference.binpb"


class Messages:
    """Message classes of the `inference` package by their short names (`messages().ModelInferRequest`)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool):
        self.pool = pool
        self.service = pool.FindServiceByName(SERVICE)

    def __getattr__(self, name: str) -> Any:
        try:
            descriptor = self.pool.FindMessageTypeByName(f"inference.{name}")
        except KeyError:
            raise AttributeError(f"the inference package has no message {name!r}") from None
        cls = message_factory.GetMessageClass(descriptor)
        setattr(self, name, cls)  # found once; later lookups are plain attributes
        return cls


@functools.cache
def messages() -> Messages:
    """The messages and the service descriptor, loaded once."""
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(files(__package__).joinpath("proto", _DESCRIPTORS).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_set.file:
        pool.Add(file)
    return Messages(pool)
