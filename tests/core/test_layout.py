"""The repository layout: which folders are versions, and what is reported as misplaced."""

from __future__ import annotations

import pytest

from kos_core.artifact import MODEL_FILENAME
from kos_core.layout import is_version, list_models, repository_problems


@pytest.mark.parametrize(
    ("name", "expected"),
    [("1", True), ("12", True), ("0", False), ("-1", False), ("v1", False), ("\u00b2", False), ("\u0661", False)],
)
def test_a_version_is_a_positive_whole_number_in_ascii_digits(name, expected):
    # "²" and Arabic-Indic "١" are digits to str.isdigit(); int() refuses the first, and neither is a folder name we write.
    assert is_version(name) is expected


def test_a_folder_named_like_a_digit_but_no_number_is_reported_not_a_crash(tmp_path):
    for version in ("1", "\u00b2"):
        (tmp_path / "digits" / version).mkdir(parents=True)
        (tmp_path / "digits" / version / MODEL_FILENAME).write_bytes(b"onnx")
    assert list_models(tmp_path) == {"digits": [1]}
    assert repository_problems(tmp_path) == ["digits/\u00b2 is not a version folder (a whole number from 1 up): ignored"]


def test_a_version_is_a_positive_integer_of_at_most_18_ascii_digits():
    assert is_version("1") and is_version("9" * 18)
    for name in ("0", "-1", "²", "1.0", "", "1" * 19, "1" * 5000):
        assert not is_version(name), name
