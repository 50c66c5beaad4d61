"""The shared-memory pieces on their own: the arena's allocator, a mapping seen by two processes, the board."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from service.shm import Allocator, Board, Mapping, create_file


def test_allocator_reuses_freed_regions_and_merges_neighbours():
    allocator = Allocator(1024)
    a, b, c = (allocator.alloc(256) for _ in range(3))
    assert (a, b, c) == (0, 256, 512)
    assert allocator.alloc(512) is None, "only 256 bytes are left"
    allocator.free(b)
    assert allocator.alloc(300) is None, "the freed 256 bytes are not 300"
    allocator.free(a)
    assert allocator.alloc(512) == 0, "a and b merged back into one run"
    allocator.free(0)
    allocator.free(c)
    assert allocator.taken == 0 and allocator.alloc(1024) == 0


def test_allocator_rounds_up_so_regions_stay_aligned():
    allocator = Allocator(4096)
    assert allocator.alloc(1) == 0 and allocator.alloc(65) == 64 and allocator.alloc(3) == 192


def test_what_one_process_writes_another_reads_in_place(tmp_path):
    path = tmp_path / "arena"
    create_file(path, 1 << 20)
    mapping = Mapping(path)
    mapping.view(4096, np.uint8, (2, 8, 8, 1))[...] = np.arange(128, dtype=np.uint8).reshape(2, 8, 8, 1)
    code = (
        "import sys, numpy as np; from pathlib import Path; from service.shm import Mapping; "
        "m = Mapping(Path(sys.argv[1])); v = m.view(4096, np.uint8, (128,)); "
        "assert (v == np.arange(128)).all(); m.view(4096, np.float32, (2, 10))[...] = 0.5"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert (mapping.view(4096, np.float32, (2, 10)) == 0.5).all()


def test_the_board_answers_only_for_the_generation_a_slot_holds(tmp_path):
    Board.create(tmp_path / "board")
    owner, front_end = Board(tmp_path / "board"), Board(tmp_path / "board")
    owner.publish(3, generation=7, depth=5, retry_after=2, queue_size=8)
    assert front_end.read(3, 7) == (5, 2, 8)
    assert front_end.read(3, 6) is None, "a slot taken over by another version says nothing of the old one"
