"""Datasets: the built-in corpus, local text/jsonl files and hub datasets, with deterministic splits.

Every source yields a list of documents (strings). A document's split (train / eval /
calibration) is decided by a hash of its name, so the same document always lands in the same
split on every machine, whatever order the files are listed in.

```yaml
data:
  train: builtin:stdlib/train            # the Python standard library's own source files
  eval: {path: notes.jsonl, field: text, split: eval}  # or {path: src/, glob: "**/*.py"}
  calibration: hf:wikitext:wikitext-2-raw-v1@train
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from slimline.config import LocalData
from slimline.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Split = Literal["train", "eval", "calibration", "all"]

# Per-mille shares of each split for sources that are split by hash.
EVAL_PER_MILLE = 40
CALIBRATION_PER_MILLE = 20


def split_of(name: str) -> str:
    """The split a document belongs to, from a stable hash of its name."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 1000
    if bucket < EVAL_PER_MILLE:
        return "eval"
    if bucket < EVAL_PER_MILLE + CALIBRATION_PER_MILLE:
        return "calibration"
    return "train"


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(split: Split) -> list[tuple[str, str]]:
    """(relative path, source text) of every standard-library ``.py`` file in ``split``."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        if split != "all" and split_of(rel) != split:
            continue
        # A few test files are deliberately not UTF-8; replacement keeps them as plain text.
        docs.append((rel, path.read_bytes().decode("utf-8", errors="replace")))
    return docs


def read_folder_documents(folder: Path, pattern: str) -> list[tuple[str, str]]:
    """(relative path, text) of every file under ``folder`` matching ``pattern``, one document each."""
    docs = [
        (path.relative_to(folder).as_posix(), path.read_bytes().decode("utf-8", errors="replace"))
        for path in sorted(folder.glob(pattern))
        if path.is_file()
    ]
    if not docs:
        raise ConfigError(f"data folder {folder} has no files matching {pattern!r}")
    return docs


def read_local_documents(path: Path, field: str | None, template: str | None = None) -> list[tuple[str, str]]:
    """Documents from a local ``.txt`` (blank-line-separated blocks) or ``.jsonl`` (a field, or a template of fields)."""
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [
            (f"{path.name}:{number}", record_text(record, field, template, f"{path}:{number}"))
            for number, record in jsonl_records(text)
        ]
    blocks = [b for b in text.split("\n\n") if b.strip()]
    return [(f"{path.name}:{i}", block) for i, block in enumerate(blocks)]


def jsonl_records(text: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line."""
    return [(number, json.loads(line)) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def record_text(record: dict, field: str | None, template: str | None, where: str) -> str:
    """One record as training text: ``template`` filled with its fields (instruction data), else one field."""
    if template is not None:
        try:
            return template.format(**record)
        except KeyError as error:
            raise ConfigError(f"{where}: template needs field {error} but the record has {sorted(record)}") from error
    key = field or "text"
    if key not in record:
        raise ConfigError(f"{where}: record has no field {key!r} (fields: {sorted(record)})")
    return str(record[key])


def read_hub_documents(spec: str, field: str | None) -> list[tuple[str, str]]:
    """Documents from a hub dataset ``path[:config][@split]`` through the ``datasets`` library."""
    try:
        import datasets
    except ImportError as error:
        raise ConfigError("hub datasets need the 'datasets' package: pip install datasets") from error
    name, _, hub_split = spec.partition("@")
    path, _, config = name.partition(":")
    dataset = datasets.load_dataset(path, config or None, split=hub_split or "train")
    key = field or "text"
    return [(f"{spec}:{i}", row[key]) for i, row in enumerate(dataset) if row[key].strip()]


def select_split(docs: list[tuple[str, str]], split: Split) -> list[str]:
    """Keep the documents of one split (all of them for ``all``)."""
    return [text for name, text in docs if split == "all" or split_of(name) == split]


def pack_tokens(token_lists: list[list[int]], separator: int) -> torch.Tensor:
    """Concatenate tokenized documents into one stream, each followed by ``separator``."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(separator)
    return torch.tensor(stream, dtype=torch.long)


def sample_windows(stream: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens from a token stream, shape (count, length)."""
    if stream.numel() <= length:
        raise ConfigError(f"the data holds {stream.numel()} tokens; at least {length + 1} are needed")
    starts = torch.randint(0, stream.numel() - length, (count,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def load_texts(source: str | LocalData, base: Path) -> list[str]:
    """The documents of a data source (see the module docstring for the forms)."""
    if isinstance(source, LocalData):
        path = source.path if source.path.is_absolute() else base / source.path
        if path.is_dir():
            docs = read_folder_documents(path, source.glob)
        else:
            docs = read_local_documents(path, source.field, source.template)
        return select_split(docs, source.split)
    kind, _, spec = source.partition(":")
    if kind == "builtin":
        corpus, _, split = spec.partition("/")
        if corpus != "stdlib" or split not in ("train", "eval", "calibration", "all"):
            raise ConfigError(f"data {source!r}: expected builtin:stdlib/<train|eval|calibration|all>")
        return [text for _, text in stdlib_documents(split)]  # type: ignore[arg-type]
    return [text for _, text in read_hub_documents(spec, None)]


def source_fingerprint(source: str | LocalData, base: Path) -> str:
    """What identifies a source's content for caching: its spec plus the bytes behind it."""
    if isinstance(source, LocalData):
        path = source.path if source.path.is_absolute() else base / source.path
        files = sorted(path.glob(source.glob)) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.read_bytes() if file.is_file() else b"missing")
        return f"{path}:{source.glob}:{source.field}:{source.template}:{source.split}:{digest.hexdigest()}"
    if source.startswith("builtin:stdlib"):
        # The corpus is this interpreter's stdlib: same Python version, same files.
        return f"{source}:python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return source


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Tokenize documents and pack them into one stream separated by the EOS token."""
    if not texts:
        raise ConfigError("the data source holds no documents")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack_tokens(ids, tokenizer.eos_token_id)
