"""A GGUF file as the pipeline's input model: dequantized once into an HF checkpoint, tokenizer as llama.cpp's.

``model: ./file.gguf`` names a local GGUF file. transformers reads it (weights dequantized,
config and tokenizer rebuilt from the file's metadata) and slimline saves the result as an
ordinary checkpoint folder (safetensors, ``config.json``, ``generation_config.json``, tokenizer
files, ``gguf_source.json``) under ``~/.cache/slimline/gguf-models/<sha256 of the file>/``,
written into a temporary sibling and renamed into place; every later validation or run reuses it.

Weights are stored in float32 unless every matrix in the file is F16 (or BF16), then in that
dtype: dequantizing a block type (``d * q + m`` with a 16-bit scale) gives values that float32
holds exactly and bfloat16 would round again.

The tokenizer needs one fix. transformers rebuilds a byte-level BPE tokenizer from the GGUF but
splits text before BPE with GPT-2's regex, whatever pre-tokenizer the file names in
``tokenizer.ggml.pre``; llama.cpp applies that name's regexes (``src/llama-vocab.cpp``). For
``smollm`` (and the StarCoder family) llama.cpp first isolates every digit, so ``"#        1"``
gives different ids. slimline writes the HF pre-tokenizer that splits the same way as the named
one (``PRE_TOKENIZERS``) into ``tokenizer.json``, then checks the saved tokenizer against
llama.cpp's on fixed edge cases and standard-library source, and refuses the model if they differ.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from slimline import cache_dir
from slimline.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "gguf_source.json"
# Bump when the conversion changes what it writes, so cached folders of older conversions are redone.
CONVERSION_VERSION = 1
ROUNDTRIP_DOCUMENTS = 8  # standard-library eval files tokenized by both tokenizers at conversion

# The HF pre-tokenizers (tokenizer.json's "pre_tokenizer") that split text as llama.cpp's regex lists do.
GPT2_SPLIT: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS_THEN_GPT2: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2_SPLIT],
}
# llama.cpp pre-tokenizer names -> that split, from llama.cpp's src/llama-vocab.cpp (llama-cpp-python 0.3.36):
# GPT-2's regex alone (pre types GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING), or "\p{N}" first and then
# GPT-2's regex (STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2). Names transformers
# already maps to their own split regex (llama-bpe, qwen2, tekken, gpt-4o ...) are left to it.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    **dict.fromkeys(
        ("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo", "jais", "trillion"), GPT2_SPLIT
    ),
    "granite-docling": GPT2_SPLIT,
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        DIGITS_THEN_GPT2,
    ),
}
# The name slimline declares to llama.cpp's converter for a tokenizer.json with one of these splits (when the
# converter does not know the tokenizer's hash): one name per split, with llama.cpp's clean_spaces off where
# the family allows it (HF's byte-level decoder does no clean-up).
DECLARED_NAMES: tuple[tuple[str, dict[str, Any]], ...] = (("gpt-2", GPT2_SPLIT), ("smollm", DIGITS_THEN_GPT2))
# Texts that stress a byte-level pre-tokenizer: whitespace runs, digits, contractions, non-ASCII.
EDGE_TEXTS = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 3.3 3..3 3...3 0x1F 1e-5 -42",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "\u00e9t\u00e9 na\u00efve \u043d\u0435\u0449\u043e \u6211\u60f3\u5728apple\u5de5\u4f5c \U0001f680 (emoji) \u2705",
    "def f(x):\n\treturn x  # trailing spaces   \n\n\nclass A:\n    pass\n",
    "''''''```````\"\"\"\"......!!!!!!?????? ------======= \\\\n \\t",
    "x = [\n        1,\n    2]  #        10\n",
)


def models_cache() -> Path:
    """Where converted GGUF models live: ``gguf-models`` in slimline's cache folder (``slimline.cache_dir``)."""
    return cache_dir() / "gguf-models"


def convert_gguf_source(path: Path) -> Path:
    """The HF checkpoint folder made from the GGUF file ``path`` (converted on first use, cached by sha256)."""
    from slimline.artifacts import sha256_file

    target = models_cache() / sha256_file(path)
    if is_current(target):
        log.debug("GGUF %s: using the converted checkpoint in %s", path, target)
        return target
    log.info("model %s is a GGUF file: converting it once into an HF checkpoint in %s (reused after)", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:12]}-", dir=target.parent))
    try:
        write_checkpoint(path, staging)
        if is_current(target):  # another process finished the same conversion first: keep that one
            return target
        if target.exists():  # a conversion by an older version of this module
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_current(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion made by this version of the conversion."""
    manifest = folder / MANIFEST
    return manifest.exists() and json.loads(manifest.read_text()).get("conversion_version") == CONVERSION_VERSION


def write_checkpoint(path: Path, folder: Path) -> dict[str, Any]:
    """Weights, config, generation config and tokenizer of the GGUF ``path`` into ``folder``; returns the manifest."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    pre_tokenizer = read_string(reader, "tokenizer.ggml.pre")
    dtype = storage_dtype(reader)
    del reader  # it maps the whole file
    save_dequantized_model(path, folder, dtype)
    carried = save_tokenizer(path, folder, pre_tokenizer)
    roundtrip = check_roundtrip(folder, path, pre_tokenizer)
    manifest = {
        "conversion_version": CONVERSION_VERSION,
        "gguf_file": str(path),
        "pre_tokenizer": pre_tokenizer,
        "pre_tokenizer_carried": carried,
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer_roundtrip": roundtrip,
        "versions": {name: metadata.version(name) for name in ("transformers", "gguf")},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_string(reader, key: str) -> str | None:
    """A string field of a GGUF's metadata, or None."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def storage_dtype(reader) -> torch.dtype:
    """float16/bfloat16 when every matrix of the file is stored so (lossless, half the size), else float32."""
    matrix_types = {tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) >= 2}
    if matrix_types == {"F16"}:
        return torch.float16
    if matrix_types == {"BF16"}:
        return torch.bfloat16
    return torch.float32


def save_dequantized_model(path: Path, folder: Path, dtype: torch.dtype) -> None:
    """Load the GGUF through transformers with every weight dequantized, and save it as safetensors."""
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise ConfigError(f"transformers cannot load the GGUF {path}: {error}") from error
    model.save_pretrained(folder, safe_serialization=True)


def save_tokenizer(path: Path, folder: Path, pre_tokenizer: str | None) -> bool:
    """Save transformers' tokenizer of the GGUF, with the named pre-tokenizer's split; whether one was carried."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    split = PRE_TOKENIZERS.get(pre_tokenizer or "")
    if split is None:
        log.info("GGUF pre-tokenizer %r: kept as transformers rebuilt it (the round trip checks it)", pre_tokenizer)
        return False
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = split
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")
    return True


def roundtrip_texts() -> list[str]:
    """The edge cases plus the first standard-library eval files."""
    from slimline.data import stdlib_documents

    return list(EDGE_TEXTS) + [text for _, text in stdlib_documents("eval")[:ROUNDTRIP_DOCUMENTS]]


def check_roundtrip(folder: Path, path: Path, pre_tokenizer: str | None) -> dict[str, Any]:
    """The saved tokenizer against llama.cpp's on the same texts; ConfigError if any ids differ."""
    try:
        import llama_cpp  # noqa: F401  (only whether it is here)
    except ImportError:
        log.warning("GGUF %s: llama-cpp-python is not installed, the tokenizer is not checked against llama.cpp", path)
        return {"checked": False}
    from transformers import AutoTokenizer

    result = compare_with_llama_cpp(AutoTokenizer.from_pretrained(folder), path, roundtrip_texts())
    if result["tokenizer_roundtrip_mismatches"]:
        raise ConfigError(
            f"the tokenizer rebuilt from {path} (pre-tokenizer {pre_tokenizer!r}) splits text differently from "
            f"llama.cpp on {result['tokenizer_roundtrip_mismatches']} of {result['tokenizer_roundtrip_texts']} texts "
            f"(first: {result['tokenizer_first_mismatch']}); slimline knows the pre-tokenizers {sorted(PRE_TOKENIZERS)} "
            "and those transformers maps itself"
        )
    return {"checked": True} | result


def compare_with_llama_cpp(tokenizer, gguf_path: Path, texts: list[str]) -> dict[str, Any]:
    """Tokenize ``texts`` with an HF tokenizer and with the GGUF's in llama.cpp (no BOS, special tokens parsed)."""
    from slimline.runtime.llama_cpp_model import open_gguf

    llama = open_gguf(gguf_path, vocab_only=True)
    mismatches, first, tokens = 0, None, 0
    try:
        for text in texts:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            actual = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            tokens += len(expected)
            if expected != actual:
                mismatches += 1
                first = first or first_difference(text, expected, actual)
    finally:
        llama.close()
    return {
        "tokenizer_roundtrip_texts": len(texts),
        "tokenizer_roundtrip_tokens": tokens,
        "tokenizer_roundtrip_mismatches": mismatches,
        "tokenizer_roundtrip_identical": (len(texts) - mismatches) / len(texts),
        "tokenizer_first_mismatch": first,
    }


def first_difference(text: str, expected: list[int], actual: list[int]) -> str:
    """Where two id lists first differ, with a little context, for an error message."""
    index = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    index = min(len(expected), len(actual)) if index is None else index
    return f"text {text[:40]!r}...: token {index}: HF {expected[index : index + 3]} vs llama.cpp {actual[index : index + 3]}"


def declared_name(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a tokenizer.json ``pre_tokenizer`` that is one of the known splits, else None."""
    for name, split in DECLARED_NAMES:
        if pre_tokenizer is not None and same_split(pre_tokenizer, split):
            return name
    return None


def same_split(found: dict[str, Any], split: dict[str, Any]) -> bool:
    """Equal pre-tokenizers, ignoring ByteLevel's ``trim_offsets`` (offsets only, never the pieces)."""
    if found.get("type") != split.get("type"):
        return False
    if split["type"] == "Sequence":
        inner = found.get("pretokenizers") or []
        return len(inner) == len(split["pretokenizers"]) and all(
            same_split(a, b) for a, b in zip(inner, split["pretokenizers"], strict=True)
        )
    ignored = {"trim_offsets"}
    keys = (set(found) | set(split)) - ignored
    return all(found.get(key, default_of(split["type"], key)) == split.get(key) for key in keys)


def default_of(kind: str, key: str) -> Any:
    """The `tokenizers` default of a pre-tokenizer field that a tokenizer.json may leave out."""
    defaults = {("ByteLevel", "use_regex"): True, ("ByteLevel", "add_prefix_space"): True}
    return defaults.get((kind, key))
