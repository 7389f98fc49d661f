"""docs/stages.md documents every registered kind and every one of its params."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.registry import STAGES, stage_module

pytestmark = pytest.mark.unit

STAGES_DOC = Path(__file__).parents[1] / "docs" / "stages.md"


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_kind_and_param_is_documented(kind: str) -> None:
    doc = STAGES_DOC.read_text()
    heading = f"## `{kind}`"
    assert heading in doc, f"docs/stages.md has no section {heading}"
    section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
    for name in stage_module(kind).Params.model_fields:
        assert f"`{name}`" in section, f"{kind}.{name} is not documented"
