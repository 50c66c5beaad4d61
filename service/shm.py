"""Shared memory between the front-end processes and the owner of the models.

Each front end has an arena: a file in a memory-backed folder (/dev/shm), mapped by that front
end and by the owner. A front end writes a request's decoded uint8 images into a region it
allocated there, the owner reads them in place (nothing is pickled or copied through a pipe) and
writes the probabilities back over them, and the front end frees the region once it has read
them. Only the front end allocates in its arena, so the allocator needs no lock between processes.

The board is one more shared file, written by the owner alone: per model version, the images
waiting in its queue, its Retry-After and its queue size, so that a front end refuses a request
to a full queue before reading the request's body, as the single process does.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

# Sparse: pages are taken only as requests use them. Bounds one front end's images in flight.
ARENA_BYTES = 64 * 1024 * 1024
_ALIGN = 64
# Per board slot: images waiting, Retry-After in seconds, queue size, and the generation of the
# model version the slot holds (a front end trusts a slot only for the generation it was told).
BOARD_SLOTS = 4096
_BOARD_FIELDS = 4


def create_file(path: Path, size: int) -> None:
    """A file of `size` zero bytes (sparse), readable and writable by this user only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class Mapping:
    """A shared file mapped into this process, with numpy views into it."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        self.size = len(self._map)

    def view(self, offset: int, dtype: type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        if offset < 0 or offset + count * np.dtype(dtype).itemsize > self.size:
            raise ValueError(f"{count} x {np.dtype(dtype)} at {offset} is outside {self.path.name} ({self.size} bytes)")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        # Views still held elsewhere keep the mapping alive; it goes with the process then.
        with contextlib.suppress(BufferError):
            self._map.close()


class Allocator:
    """First-fit regions of an arena of `size` bytes; freed neighbours merge again."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self._taken: dict[int, int] = {}

    @property
    def taken(self) -> int:
        return sum(self._taken.values())

    def alloc(self, length: int) -> int | None:
        """The offset of `length` free bytes, or None when no free run is that long now."""
        length = max(_ALIGN, -(-length // _ALIGN) * _ALIGN)
        for i, (offset, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, free - length)
                self._taken[offset] = length
                return offset
        return None

    def free(self, offset: int) -> None:
        length = self._taken.pop(offset)
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        # Merge with the following run, then with the preceding one.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            self._free[i] = (offset, length + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            previous = self._free.pop(i - 1)
            self._free[i - 1] = (previous[0], previous[1] + self._free[i - 1][1])


class Board:
    """The owner's published queue state per model version slot; see the module's docstring."""

    def __init__(self, path: Path):
        self._mapping = Mapping(path)
        self._rows = self._mapping.view(0, np.int64, (BOARD_SLOTS, _BOARD_FIELDS))

    @staticmethod
    def create(path: Path) -> None:
        create_file(path, BOARD_SLOTS * _BOARD_FIELDS * 8)

    def publish(self, slot: int, generation: int, depth: int, retry_after: int, queue_size: int) -> None:
        row = self._rows[slot]
        row[0], row[1], row[2], row[3] = depth, retry_after, queue_size, generation

    def read(self, slot: int, generation: int) -> tuple[int, int, int] | None:
        """(depth, retry_after, queue_size) of the slot, or None when it holds another version now."""
        depth, retry_after, queue_size, held = (int(v) for v in self._rows[slot])
        return (depth, retry_after, queue_size) if held == generation else None

    def close(self) -> None:
        del self._rows
        self._mapping.close()
