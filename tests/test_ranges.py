"""sharing.ranges.index_ranges: the one way GPU indices and slots are written as runs."""

from __future__ import annotations

import pytest

from sharing.ranges import index_ranges


@pytest.mark.parametrize(
    ("numbers", "sep", "expected"),
    [
        pytest.param([], ", ", "", id="empty"),
        pytest.param([4], ", ", "4", id="one"),
        pytest.param([3, 0, 2, 1, 6], ", ", "0-3, 6", id="unsorted run and a single"),
        pytest.param([1, 1, 2], ", ", "1-2", id="duplicates dropped"),
        pytest.param([0, 1, 4, 5, 7], ",", "0-1,4-5,7", id="compact separator"),
    ],
)
def test_index_ranges(numbers, sep, expected):
    assert index_ranges(numbers, sep) == expected
