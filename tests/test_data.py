"""Data sources and deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimline.config import LocalData
from slimline.data import load_texts, pack_tokens, sample_windows, source_fingerprint, split_of, stdlib_documents
from slimline.errors import ConfigError

pytestmark = pytest.mark.unit


def test_split_is_stable_and_roughly_proportional() -> None:
    names = [f"doc-{i}" for i in range(20_000)]
    splits = [split_of(name) for name in names]
    assert splits == [split_of(name) for name in names]
    assert splits.count("eval") / len(names) == pytest.approx(0.04, abs=0.01)
    assert splits.count("calibration") / len(names) == pytest.approx(0.02, abs=0.01)


def test_stdlib_splits_are_disjoint_and_cover_the_corpus() -> None:
    train = {name for name, _ in stdlib_documents("train")}
    held_out = {name for name, _ in stdlib_documents("eval")}
    calibration = {name for name, _ in stdlib_documents("calibration")}
    assert len(held_out) > 20 and len(train) > 1000
    assert not (train & held_out) and not (train & calibration) and not (held_out & calibration)
    assert train | held_out | calibration == {name for name, _ in stdlib_documents("all")}
    assert not any("site-packages" in name for name in train)


def test_local_jsonl_and_text(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(50)))
    texts = load_texts(LocalData(path=Path("data.jsonl"), field="body"), tmp_path)
    assert texts[:2] == ["text 0", "text 1"] and len(texts) == 50
    held_out = load_texts(LocalData(path=path, field="body", split="eval"), tmp_path)
    assert set(held_out) < set(texts)
    (tmp_path / "notes.txt").write_text("first block\n\nsecond block\n")
    assert load_texts(LocalData(path=Path("notes.txt")), tmp_path) == ["first block", "second block\n"]


def test_folder_of_files_is_split_by_relative_path(tmp_path: Path) -> None:
    for i in range(60):
        (tmp_path / "src" / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"pkg{i % 3}" / f"m{i}.py").write_text(f"x = {i}\n")
    every = load_texts(LocalData(path=Path("src"), glob="**/*.py"), tmp_path)
    assert len(every) == 60
    train = load_texts(LocalData(path=Path("src"), glob="**/*.py", split="train"), tmp_path)
    assert 40 < len(train) < 60
    with pytest.raises(ConfigError, match="no files matching"):
        load_texts(LocalData(path=Path("src"), glob="**/*.md"), tmp_path)


def test_instruction_records_are_rendered_through_the_template(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "add 1", "response": "x + 1"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    template = "### user:\n{prompt}\n### assistant:\n{response}"
    with pytest.raises(ConfigError, match=r"chat.jsonl:2: template needs field 'response'"):
        load_texts(LocalData(path=path, template=template), tmp_path)
    path.write_text(json.dumps({"prompt": "add 1", "response": "x + 1"}) + "\n")
    assert load_texts(LocalData(path=path, template=template), tmp_path) == ["### user:\nadd 1\n### assistant:\nx + 1"]


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ConfigError, match="has no field 'text'"):
        load_texts(LocalData(path=Path("data.jsonl")), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts(LocalData(path=Path("missing.jsonl")), tmp_path)
    with pytest.raises(ConfigError, match="builtin:stdlib/<train"):
        load_texts("builtin:stdlib/test", tmp_path)


def test_fingerprint_follows_file_content(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = source_fingerprint(LocalData(path=path), tmp_path)
    path.write_text("two")
    assert source_fingerprint(LocalData(path=path), tmp_path) != before


def test_pack_and_sample_windows() -> None:
    stream = pack_tokens([[5, 6], [7]], separator=0)
    assert stream.tolist() == [5, 6, 0, 7, 0]
    windows = sample_windows(torch.arange(100), 8, 10, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 10)
    assert all((row[1:] - row[:-1] == 1).all() for row in windows)
    with pytest.raises(ConfigError, match="at least 11 are needed"):
        sample_windows(torch.arange(10), 1, 10, torch.Generator())


def test_token_cache_returns_the_stream_tokenizing_would_and_follows_every_input(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimline.data import cached_token_stream, token_cache_folder, tokenize_stream
    from slimline.models import load_tokenizer

    monkeypatch.delenv("SLIMLINE_CACHE", raising=False)  # it would win over XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tokenizer = load_tokenizer(tiny_model)
    texts = ["def f(x):\n    return x\n", "print('héllo')\n"]
    fresh = tokenize_stream(tokenizer, texts)
    first = cached_token_stream(tokenizer, texts)
    entries = list(token_cache_folder().glob("*.npy"))
    assert len(entries) == 1 and torch.equal(first, fresh)
    again = cached_token_stream(tokenizer, texts)  # read back from the entry
    assert torch.equal(again, fresh) and again.dtype == torch.long

    changed = [texts[0], texts[1].replace("h", "j")]  # one changed character is another key
    assert torch.equal(cached_token_stream(tokenizer, changed), tokenize_stream(tokenizer, changed))
    split_differently = ["def f(x):\n", "    return x\n" + texts[1]]  # same bytes, other documents
    assert torch.equal(cached_token_stream(tokenizer, split_differently), tokenize_stream(tokenizer, split_differently))
    assert len(list(token_cache_folder().glob("*.npy"))) == 3

    for damage in (b"not an array", b""):  # a damaged entry is tokenized again and replaced
        entries[0].write_bytes(damage)
        assert torch.equal(cached_token_stream(tokenizer, texts), fresh)
        assert torch.equal(cached_token_stream(tokenizer, texts), fresh)
    entries[0].write_bytes(entries[0].read_bytes()[:-3])  # cut short
    assert torch.equal(cached_token_stream(tokenizer, texts), fresh)
    assert not list(token_cache_folder().glob("*.partial"))
