"""The serve bundle: one typed record of the pair, with its defaults in one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimline.errors import ArtifactError
from slimline.serve.bundle import BUNDLE_FILE, ServeBundle, read_bundle, write_bundle
from slimline.serve.stage import Params

pytestmark = pytest.mark.unit


def test_a_bundle_round_trips_through_serve_json(tmp_path: Path) -> None:
    bundle = ServeBundle(tmp_path / "target", tmp_path / "draft", k=3, adaptive=False)
    write_bundle(tmp_path, bundle)
    assert json.loads((tmp_path / BUNDLE_FILE).read_text())["draft"] == str(tmp_path / "draft")
    assert read_bundle(tmp_path) == bundle


def test_the_stage_params_take_their_defaults_from_the_bundle() -> None:
    params = Params(draft="d")
    assert (params.k, params.adaptive) == (ServeBundle.k, ServeBundle.adaptive) == (4, True)


def test_absent_fields_take_the_defaults_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    (tmp_path / BUNDLE_FILE).write_text(json.dumps({"target": "/t", "draft": "/d"}))
    assert read_bundle(tmp_path) == ServeBundle(Path("/t"), Path("/d"))
    (tmp_path / BUNDLE_FILE).write_text(json.dumps({"target": "/t", "drafts": "/d"}))
    with pytest.raises(ArtifactError, match="not a serve bundle"):
        read_bundle(tmp_path)
    (tmp_path / BUNDLE_FILE).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="must hold a JSON object"):
        read_bundle(tmp_path)
    with pytest.raises(ArtifactError, match="not a serve artifact"):
        read_bundle(tmp_path / "elsewhere")
