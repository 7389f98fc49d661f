"""The project's one percentile (per-token latency, the serving benchmark's load run): nearest rank."""

from __future__ import annotations

import pytest

from slimline.evaluate.latency import percentile


@pytest.mark.unit
@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [
        (1, 0.95, 1),
        (4, 0.5, 2),
        (5, 0.5, 3),  # rank ceil(2.5) = 3, not a rounded-down 2
        (20, 0.95, 19),
        (192, 0.95, 183),  # ceil(182.4)
        (320, 0.95, 304),  # 0.95 * 320 is 304 up to float error: not 305
        (10, 0.0, 1),
        (10, 1.0, 10),
    ],
)
def test_percentile_is_nearest_rank(count: int, fraction: float, expected: int) -> None:
    values = [float(v) for v in range(count, 0, -1)]  # unsorted on purpose
    assert percentile(values, fraction) == expected
