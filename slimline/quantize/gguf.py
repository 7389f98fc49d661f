"""GGUF for llama.cpp: convert with llama.cpp's own converter, quantize with ``llama_model_quantize``.

The HF checkpoint goes through ``convert_hf_to_gguf.py`` (see ``gguf_converter.py``) to a 16-bit
(or f32) GGUF; any other type is then made by llama.cpp's quantizer through llama-cpp-python,
optionally weighted by an importance matrix measured on the calibration split
(``gguf_imatrix.py``). K-quant mixes (``Q4_K_M`` ...) are llama.cpp's: a few sensitive tensors
get a wider type, and a tensor whose rows do not split into its type's blocks (256 weights for
K-quants) falls back to another type, as llama.cpp decides; the stage lists those tensors (from
llama.cpp's own report) and the file's real bits per weight. Before publishing, the GGUF's
tokenizer is checked against the HF tokenizer on real text: the ids must be identical, or the
stage fails. The artifact (format ``gguf``, one ``model.gguf``) is evaluated through llama.cpp
(``runtime/llama_cpp_model.py``).

```yaml
- id: q4
  kind: quantize.gguf
  from: input
  params: {type: Q4_K_M}
```
"""

from __future__ import annotations

import ctypes
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact, require_full_model
from slimline.errors import StageError
from slimline.models import load_tokenizer, stored_dtype
from slimline.models.gguf_source import EDGE_TEXTS, compare_with_llama_cpp, read_string
from slimline.quantize import gguf_converter
from slimline.quantize.common import QUANTIZED_KEY, check_gguf_converter_keys, check_unquantized_shape
from slimline.runtime.llama_cpp_log import take_recent_messages
from slimline.runtime.llama_cpp_model import MODEL_FILE, collect_llama_cpp_log
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec(
    kind="quantize.gguf",
    requires=("llama_cpp", "gguf", "sentencepiece"),
    extra="gguf",
    device="cpu",
    data=("calibration",),
    # llama.cpp's converter must have been fetched: it is not in llama-cpp-python's wheel
    missing_tools=gguf_converter.missing_converter,
)

GgufType = Literal[
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "IQ4_XS",
    "IQ4_NL",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
]
# Types the converter writes itself, with its --outtype; every other type is made by llama_model_quantize.
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# Weights per quantization block. A tensor whose rows (ncols) are not a multiple of its type's block falls back,
# in llama.cpp's tensor_type_fallback (src/llama-quant.cpp): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
# Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, and to F16 when the fallback's 32-weight blocks do not fit either.
SUPER_BLOCK = 256
LEGACY_BLOCK = 32
# llama.cpp's log text for each fallback, and its count at the end (llama-cpp-python 0.3.36's llama.cpp).
FALLBACK_LINE = re.compile(
    r"warning: (?P<name>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: [^)]*\)\s*)?->\s*falling back to\s+(?P<actual>\S+)"
)
FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


class Params(StageParams):
    """The GGUF type to write, the importance matrix, and how the tokenizer is checked."""

    type: GgufType = Field(
        description="llama.cpp type: F16/BF16/F32 straight from the converter; Q8_0 is near-lossless, "
        "K-quants (Q6_K ... Q2_K) trade size for accuracy; _M mixes keep sensitive tensors wider than _S."
    )
    imatrix: bool = Field(
        False,
        description="Weight quantization error by an importance matrix (mean squared activations per input "
        "channel, measured on calibration data); helps most at 4 bits and below. Not for F16/BF16/F32.",
    )
    imatrix_samples: int = Field(32, ge=1, le=4096, description="Calibration sequences for the importance matrix.")
    imatrix_length: int = Field(256, ge=8, description="Tokens per importance-matrix calibration sequence.")
    threads: int | None = Field(
        None, ge=1, description="Threads for llama.cpp's quantizer; default: the threads PyTorch uses."
    )
    tokenizer_check_tokens: int = Field(
        20000,
        ge=0,
        description="Calibration tokens decoded to text and re-tokenized by both tokenizers (plus fixed edge cases).",
    )

    @model_validator(mode="after")
    def check_imatrix(self) -> Params:
        """An importance matrix only steers quantization; float types have none."""
        if self.imatrix and self.type in CONVERTER_TYPES:
            raise ValueError(f"imatrix applies to quantized types, not {self.type}; set imatrix: false")
        return self


def block_size(gguf_type: str) -> int:
    """Weights per block of ``gguf_type``: 256 for K-quants and IQ4_XS, 32 for legacy quants, 1 for floats."""
    if gguf_type in CONVERTER_TYPES:
        return 1
    if "_K" in gguf_type or gguf_type == "IQ4_XS":
        return SUPER_BLOCK
    return LEGACY_BLOCK


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Refuse a quantized input and an architecture the converter lacks; widths are never refused.

    llama.cpp quantizes every width: a tensor whose rows its type's blocks do not divide falls back to
    another type (``tensor_type_fallback``), which the stage reports. Validation only says it will happen.
    """
    problems = check_unquantized_shape(SPEC.kind, shape)
    problems += check_architecture(shape.config)
    problems += check_gguf_converter_keys(shape)
    narrow = narrow_widths(params.type, shape.config)
    if narrow:
        log.info(
            "%s: the model's %s are not multiples of %d weights; llama.cpp will quantize those rows with a fallback "
            "type (listed in the stage figures)",
            params.type,
            narrow,
            block_size(params.type),
        )
    return problems, shape.changed(**{QUANTIZED_KEY: {"quant_method": f"gguf-{params.type}"}})


def narrow_widths(gguf_type: str, config: dict[str, Any]) -> dict[str, int]:
    """The row lengths of the model's matrices (hidden and FFN widths) that ``gguf_type``'s blocks do not divide."""
    block = block_size(gguf_type)
    widths = {name: config.get(name) for name in ("hidden_size", "intermediate_size")}
    return {name: width for name, width in widths.items() if isinstance(width, int) and width % block}


def check_architecture(config: dict[str, Any]) -> ShapeProblems:
    """The model's architecture must be one the converter registers (checked when the converter is here)."""
    version = gguf_converter.llama_cpp_version()
    if version is None or gguf_converter.missing_converter():
        return []  # preflight refuses the stage with the fix
    supported = gguf_converter.supported_architectures(gguf_converter.converter_home(version))
    architectures = config.get("architectures") or []
    unsupported = [name for name in architectures if name not in supported]
    if unsupported or not architectures:
        return [((), f"llama.cpp's converter ({version}) does not support the architecture {architectures}")]
    return []


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Convert, quantize, check the tokenizer, and leave model.gguf in the work folder."""
    parent = inputs[0]
    require_full_model(parent, SPEC.kind)
    converter = gguf_converter.find_converter()
    target = ctx.work_dir / MODEL_FILE
    built = write_gguf(params, parent, converter, target, ctx)
    tokenizer = check_tokenizer(target, parent.model_path, ctx.data.stream("calibration"), params)
    if tokenizer["tokenizer_roundtrip_identical"] < 1.0:
        raise StageError(
            f"the GGUF's tokenizer differs from the HF tokenizer on {tokenizer['tokenizer_roundtrip_mismatches']} "
            f"of {tokenizer['tokenizer_roundtrip_texts']} texts (first: {tokenizer['tokenizer_first_mismatch']}); "
            "llama.cpp would score and generate different tokens"
        )
    check_fallbacks(target, built["fallback_tensors"])
    metrics = describe_gguf(target, params.type) | built | tokenizer
    metrics["converter"] = gguf_converter.converter_info(converter)
    return StageOutput(format="gguf", metrics=metrics)


def write_gguf(params: Params, parent: Artifact, converter: Path, target: Path, ctx: StageContext) -> dict[str, Any]:
    """Convert (and quantize) into ``target``; the 16-bit intermediate goes in a scratch folder, deleted after.

    Returns figures of the build: whether the pre-tokenizer was declared, the fallback tensors, the importance
    matrix's size (if one was used).
    """
    pre_tokenizer = gguf_converter.declared_pre_tokenizer(parent.model_path)
    if params.type in CONVERTER_TYPES:
        with ctx.progress.task(f"{ctx.stage_id}: convert", 1) as advance:
            declared = gguf_converter.convert(
                converter, parent.model_path, target, CONVERTER_TYPES[params.type], pre_tokenizer
            )
            advance(1)
        return {"pre_tokenizer_declared": declared, "fallback_summary": {}, "fallback_tensors": []}
    scratch = ctx.work_dir / "_build"
    scratch.mkdir()
    source = scratch / "model-16bit.gguf"
    with ctx.progress.task(f"{ctx.stage_id}: convert + quantize", 2) as advance:
        declared = gguf_converter.convert(
            converter, parent.model_path, source, intermediate_type(parent), pre_tokenizer
        )
        advance(1)
        importance = compute_importance(params, parent, source, ctx) if params.imatrix else None
        fallbacks = quantize_file(source, target, params, importance)
        advance(1)
    shutil.rmtree(scratch)
    built = {
        "pre_tokenizer_declared": declared,
        "fallback_summary": summarize_fallbacks(fallbacks),
        "fallback_tensors": fallbacks,
    }
    if importance is not None:
        built["imatrix_tensors"] = len(importance)
    return built


def intermediate_type(parent: Artifact) -> str:
    """What the converter writes before quantizing: f32 for a float32 checkpoint, else its 16-bit type."""
    return "f32" if stored_dtype(parent.model_path) == torch.float32 else "auto"


def compute_importance(params: Params, parent: Artifact, source: Path, ctx: StageContext):
    """The importance matrix on calibration windows, named by the GGUF's tensors."""
    from slimline.quantize.common import calibration_windows
    from slimline.quantize.gguf_imatrix import importance_matrix

    windows = calibration_windows(ctx, params.imatrix_samples, params.imatrix_length)
    return importance_matrix(parent.model_path, source, windows)


def quantize_file(
    source: Path, target: Path, params: Params, importance: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """``llama_model_quantize`` from the converter's file to ``params.type``; StageError if llama.cpp refuses.

    Returns the tensors llama.cpp fell back to another type for, as its log reports them.
    """
    import llama_cpp

    from slimline.quantize.gguf_imatrix import imatrix_array

    settings = llama_cpp.llama_model_quantize_default_params()
    settings.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{params.type}")
    settings.nthread = params.threads or torch.get_num_threads()
    matrix = imatrix_array(importance) if importance is not None else None  # kept alive across the call
    if matrix is not None:
        settings.imatrix = ctypes.cast(matrix.entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    log.info("llama_model_quantize %s -> %s (%d threads)", source.name, params.type, settings.nthread)
    with collect_llama_cpp_log() as pieces:
        take_recent_messages()
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(settings))
    del matrix
    if code != 0 or not target.exists():
        raise StageError(f"llama_model_quantize failed to make {params.type} (code {code}): {take_recent_messages()}")
    fallbacks = read_fallbacks("".join(pieces))
    for fallback in fallbacks:
        log.info(
            "%s: rows of %d weights -> %s instead of %s",
            fallback["name"],
            fallback["row_length"],
            fallback["actual"],
            fallback["wanted"],
        )
    return fallbacks


def read_fallbacks(text: str) -> list[dict[str, Any]]:
    """The fallback tensors in llama.cpp's quantization log: name, row length, wanted and actual type.

    StageError when the tensors found disagree with llama.cpp's own count of them (a changed log format).
    """
    fallbacks = {
        match["name"]: {
            "name": match["name"],
            "row_length": int(match["ncols"]),
            "actual": match["actual"].upper(),
            "wanted": match["wanted"].upper(),
        }
        for match in FALLBACK_LINE.finditer(text)
    }
    counted = FALLBACK_COUNT.search(text)
    expected = int(counted.group(1)) if counted else 0
    if expected != len(fallbacks):
        raise StageError(
            f"llama.cpp reports {expected} fallback tensor(s) and slimline read {len(fallbacks)} from its log; "
            "its log format may have changed"
        )
    return list(fallbacks.values())


def summarize_fallbacks(fallbacks: list[dict[str, Any]]) -> dict[str, int]:
    """How many tensors fell back, per 'wanted -> actual' pair."""
    summary: dict[str, int] = {}
    for fallback in fallbacks:
        pair = f"{fallback['wanted']} -> {fallback['actual']}"
        summary[pair] = summary.get(pair, 0) + 1
    return dict(sorted(summary.items()))


def check_fallbacks(path: Path, fallbacks: list[dict[str, Any]]) -> None:
    """Each fallback tensor of the GGUF at ``path`` must hold the type llama.cpp said it fell back to."""
    from gguf import GGUFReader

    types = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}
    wrong = [f"{f['name']}: {types.get(f['name'])}" for f in fallbacks if types.get(f["name"]) != f["actual"]]
    if wrong:
        raise StageError(f"the GGUF's fallback tensors do not hold the types llama.cpp reported: {wrong}")


def describe_gguf(path: Path, gguf_type: str) -> dict[str, Any]:
    """Type, size, bits per weight, the tensor types llama.cpp chose, and the tokenizer metadata.

    ``bits_per_weight`` is the file's real figure: 8 x bytes of tensor data / number of weights, every tensor
    counted (norms, fallback tensors).
    """
    from gguf import GGUFReader

    reader = GGUFReader(path)
    elements = sum(int(tensor.n_elements) for tensor in reader.tensors)
    tensor_bytes = sum(int(tensor.n_bytes) for tensor in reader.tensors)
    type_of = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    types: dict[str, int] = {}
    for type_name in type_of.values():
        types[type_name] = types.get(type_name, 0) + 1
    return {
        "gguf_type": gguf_type,
        "file_mb": path.stat().st_size / 1e6,
        "bits_per_weight": 8 * tensor_bytes / elements,
        "tensor_types": dict(sorted(types.items())),
        "output_tensor_type": type_of.get("output.weight") or type_of.get("token_embd.weight"),
        "gguf_parameters": elements,
        "pre_tokenizer": read_string(reader, "tokenizer.ggml.pre"),
    }


# --- tokenizer round-trip ------------------------------------------------------------------


def check_tokenizer(path: Path, model_path: Path, stream: torch.Tensor, params: Params) -> dict[str, Any]:
    """Tokenize the same texts with the HF tokenizer and the GGUF's (llama.cpp); count identical id lists."""
    tokenizer = load_tokenizer(model_path)
    texts = list(EDGE_TEXTS) + calibration_texts(tokenizer, stream[: params.tokenizer_check_tokens])
    return compare_with_llama_cpp(tokenizer, path, texts)


def calibration_texts(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Calibration documents as text: the token stream split at EOS and decoded."""
    eos = tokenizer.eos_token_id
    texts, current = [], []
    for token in tokens.tolist():
        if token == eos:
            texts.append(current)
            current = []
        else:
            current.append(token)
    texts.append(current)
    return [tokenizer.decode(ids) for ids in texts if ids]
