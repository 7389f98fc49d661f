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
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from slimline import cache_dir
from slimline.errors import ConfigError
from slimline.sources import LocalData
from slimline.untrusted import UntrustedInputError, json_depth, read_bytes_bounded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Split = Literal["train", "eval", "calibration", "all"]

# Bounds on local data files (docs/stages.md, "Limits"): a longer line is refused with its file and number.
MAX_DATA_LINE_BYTES = 16 * 1024 * 1024
MAX_FOLDER_FILE_BYTES = 64 * 1024 * 1024  # one document of a {path: folder, glob: ...} source
MAX_RECORD_DEPTH = 64  # JSON nesting of one jsonl record
NUL = b"\0"
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
    """(relative path, text) of every file under ``folder`` matching ``pattern``, one document each.

    Each file is read with ``read_bytes_bounded`` (at most ``MAX_FOLDER_FILE_BYTES``); bytes that are
    not UTF-8 become U+FFFD, as in the built-in corpus.
    """
    docs = []
    for path in sorted(folder.glob(pattern)):
        if path.is_file():
            try:
                data = read_bytes_bounded(path, MAX_FOLDER_FILE_BYTES, "data file")
            except UntrustedInputError as error:
                raise ConfigError(str(error)) from error
            docs.append((path.relative_to(folder).as_posix(), data.decode("utf-8", errors="replace")))
    if not docs:
        raise ConfigError(f"data folder {folder} has no files matching {pattern!r}")
    return docs


def read_local_documents(path: Path, field: str | None, template: str | None = None) -> list[tuple[str, str]]:
    """Documents from a local ``.txt`` (blank-line-separated blocks) or ``.jsonl`` (a field, or a template of fields)."""
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"data file {path} is not a regular file")
    lines = read_text_lines(path)
    if not any(line.strip() for line in lines):
        raise ConfigError(f"{path}: the data file is empty (no documents)")
    if path.suffix == ".jsonl":
        return [
            (f"{path.name}:{number}", record_text(record, field, template, f"{path}:{number}"))
            for number, record in jsonl_records(lines, path)
        ]
    text = "".join(lines).replace("\r\n", "\n").replace("\r", "\n")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    return [(f"{path.name}:{i}", block) for i, block in enumerate(blocks)]


def read_text_lines(path: Path) -> list[str]:
    """The lines of a text file (ends kept), strictly UTF-8, none longer than ``MAX_DATA_LINE_BYTES``, no NUL bytes.

    Read a line at a time with a bounded ``readline``, so a 1 GB file without line breaks costs at
    most the bound in memory before it is refused; every refusal names the file, line and column.
    """
    lines = []
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_DATA_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_DATA_LINE_BYTES:
                raise ConfigError(
                    f"{path}:{number}: a line longer than {MAX_DATA_LINE_BYTES:,} bytes; is it text with line breaks?"
                )
            if NUL in raw:
                raise ConfigError(f"{path}:{number}:{raw.index(NUL) + 1}: a NUL byte; is it a binary file?")
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"{path}:{number}:{error.start + 1}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                    "is it a binary file?"
                ) from error
    return lines


def jsonl_records(lines: list[str], path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; each must be one JSON object, nested at most MAX_RECORD_DEPTH."""
    return [
        (number, parse_record(line, f"{path}:{number}")) for number, line in enumerate(lines, start=1) if line.strip()
    ]


def parse_record(line: str, where: str) -> dict:
    """One jsonl line as a JSON object; ConfigError naming the line and column otherwise."""
    depth = json_depth(line.encode("utf-8"))
    if depth > MAX_RECORD_DEPTH:
        raise ConfigError(f"{where}: JSON nested {depth} deep; records may nest at most {MAX_RECORD_DEPTH}")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}:{error.colno}: not valid JSON: {error.msg}") from error
    except RecursionError as error:
        raise ConfigError(f"{where}: JSON nested too deeply to parse") from error
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected one JSON object per line, got {type(record).__name__}")
    return record


def record_text(record: dict, field: str | None, template: str | None, where: str) -> str:
    """One record as training text: ``template`` filled with its fields (instruction data), else one field."""
    if template is not None:
        try:
            return template.format(**record)
        except KeyError as error:
            raise ConfigError(f"{where}: template needs field {error} but the record has {sorted(record)}") from error
        except (IndexError, ValueError, AttributeError, TypeError) as error:
            raise ConfigError(f"{where}: the template cannot be filled from this record: {error}") from error
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
            if not file.is_file():
                digest.update(b"missing")
                continue
            with file.open("rb") as handle:  # in blocks: a data file may be larger than memory
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
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


# --- the token cache ------------------------------------------------------------------------
# Tokenizing the built-in train split (8.1M tokens) takes seconds on every run that trains; the
# packed stream is kept under ~/.cache/slimline/tokens, keyed by the documents' own bytes and the
# tokenizer's full serialisation, so a changed file, split rule or vocabulary is a new key.
TOKEN_CACHE_VERSION = 1


def token_cache_folder() -> Path:
    """Where packed token streams are kept: ``tokens`` in slimline's cache folder (``slimline.cache_dir``)."""
    return cache_dir() / "tokens"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of everything that decides a fast tokenizer's ids; None for a slow one (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


def stream_key(tokenizer_digest: str, texts: list[str]) -> str:
    """The cache key of a stream: the tokenizer's digest and every document's bytes, length-prefixed."""
    digest = hashlib.sha256(f"v{TOKEN_CACHE_VERSION}:{tokenizer_digest}:{len(texts)}".encode())
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def cached_token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """``tokenize_stream``, kept in the token cache: the same documents and tokenizer are tokenized once."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None or not texts:
        return tokenize_stream(tokenizer, texts)
    path = token_cache_folder() / f"{stream_key(fingerprint, texts)}.npy"
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError) as error:  # a damaged entry: tokenize again and replace it
        log.debug("token cache entry %s unreadable (%s); tokenizing again", path, error)
    stream = tokenize_stream(tokenizer, texts)
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as handle:
            partial = Path(handle.name)
            np.save(handle, stream.numpy().astype(np.uint16 if int(stream.max()) < 2**16 else np.int32))
        partial.replace(path)  # whole or absent: a concurrent run never reads a partial entry
    except OSError as error:  # a read-only or full cache folder costs the speed-up only
        if partial is not None:
            partial.unlink(missing_ok=True)
        log.debug("token cache not written to %s: %s", path, error)
    return stream
