"""Rows of a run and the Pareto front."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.errors import ReportError
from slimline.reports.rows import Row, pareto_front, read_summary, row_from_summary

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("points", "front"),
    [
        # one point is its own front
        ([(1.0, 1.0)], [0]),
        # a point better on both coordinates dominates
        ([(2.0, 2.0), (1.0, 1.0)], [1]),
        # a trade-off: neither dominates; the front is sorted by x
        ([(3.0, 1.0), (1.0, 3.0), (2.0, 2.0)], [1, 2, 0]),
        # equal on one coordinate, worse on the other: dominated
        ([(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)], [0]),
        # identical points dominate neither each other
        ([(1.0, 1.0), (1.0, 1.0), (2.0, 2.0)], [0, 1]),
    ],
)
def test_pareto_front(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


def test_row_of_a_failed_stage_has_no_figures_and_says_why() -> None:
    row = row_from_summary({"stage": "x", "kind": "lora", "status": "failed", "reason": "boom", "metrics": {}})
    assert row == Row("x", "lora", "failed", "boom")
    assert not row.measured and row.note == "failed: boom"


def test_read_summary_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such run folder"):
        read_summary(tmp_path / "missing")
    with pytest.raises(ReportError, match=r"summary.json not found"):
        read_summary(tmp_path)
