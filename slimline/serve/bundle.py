"""The serve bundle (``serve.json``): the target/draft pair a ``serve`` artifact names, with k and adaptivity.

The serve stage writes it; ``slimline serve`` and the speculative evaluation backend read it. The
defaults of k and adaptivity live here and nowhere else: the stage's params, the server and the
command line's help all take them from ``ServeBundle``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from slimline.errors import ArtifactError

BUNDLE_FILE = "serve.json"


@dataclass(frozen=True)
class ServeBundle:
    """A target model, the draft that proposes tokens for it (none: target only), and the draft length."""

    target: Path
    draft: Path | None = None
    k: int = 4  # draft tokens per round; the start value when adaptive
    adaptive: bool = True  # adapt k to the measured acceptance rate and costs

    def to_json(self) -> dict[str, Any]:
        """The bundle as ``serve.json`` holds it (paths as strings)."""
        data = asdict(self)
        data["target"], data["draft"] = str(self.target), None if self.draft is None else str(self.draft)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> ServeBundle:
        """A bundle from ``serve.json``'s fields; absent k/adaptive take the defaults, unknown fields are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown or "target" not in data:
            raise ArtifactError(
                f"{where} is not a serve bundle: expected the fields {sorted(names)}, got {sorted(data)}"
            )
        draft = data.get("draft")
        return cls(**{**data, "target": Path(data["target"]), "draft": Path(draft) if draft else None})


def write_bundle(folder: Path, bundle: ServeBundle) -> None:
    """Write ``serve.json`` into ``folder``."""
    (folder / BUNDLE_FILE).write_text(json.dumps(bundle.to_json(), indent=2) + "\n")


def read_bundle(folder: Path) -> ServeBundle:
    """The pair a serve artifact names."""
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {BUNDLE_FILE}: not a serve artifact")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return ServeBundle.from_json(data, path)


def check_same_vocabulary(target_tokenizer: Any, draft_tokenizer: Any, target: Path, draft: Path) -> None:
    """Speculative decoding compares token ids: both models must use the same tokenizer."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ArtifactError(f"the draft {draft} has a different vocabulary from the target {target}")
