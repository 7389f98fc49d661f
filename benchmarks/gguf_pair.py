"""A target/draft pair of PyTorch stages as GGUF files (f16 unless told), for llama.cpp baselines (speculative.py, serving.py)."""

from __future__ import annotations

from pathlib import Path

from slimline.artifacts import read_artifact


def gguf_pair(
    stages: Path, folder: Path, stage_ids: tuple[str, str] = ("tuned", "draft"), outtype: str = "f16"
) -> tuple[Path, Path]:
    """The pair's PyTorch target and draft (``stage_ids``) as ``outtype`` GGUF files, converted once into ``folder``."""
    from slimline.quantize.gguf_converter import convert, declared_pre_tokenizer, find_converter

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for stage in stage_ids:
        key = read_artifact(stages / stage).key[:12]  # a rebuilt stage gets a new file
        outfile = folder / f"{stage}-{key}.{outtype}.gguf"
        if not outfile.exists():
            partial = folder / f"{stage}-{key}.partial.gguf"
            model = stages / stage
            convert(find_converter(), model, partial, outtype, declared_pre_tokenizer(model))
            partial.rename(outfile)
        files.append(outfile)
    return files[0], files[1]
