"""llama.cpp's HF -> GGUF converter: where it lives, what it supports, and running it.

The converter (``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``) ships in
llama-cpp-python's source distribution (``vendor/llama.cpp``), not in its wheel. ``fetch``
unpacks just those files, for the installed llama-cpp-python version, into
``~/.cache/slimline/llama.cpp-<version>/`` (slimline's cache folder, ``slimline.cache_dir``), with a
``converter.json`` naming the version and the llama.cpp commit, so the converter and the
runtime that loads its files always come from the same llama.cpp. ``make install`` runs it::

    python -m slimline.quantize.gguf_converter fetch [--sdist llama_cpp_python-X.tar.gz]

Conversion runs in a subprocess (``python -m slimline.quantize.gguf_converter convert ...``):
the converter imports its own ``gguf`` package and holds the whole model while writing, and
neither should leak into the pipeline's process. The one addition slimline makes there is a
declared pre-tokenizer: the converter identifies a BPE pre-tokenizer by a hash of its output
on a fixed text and refuses hashes it does not list; for a tokenizer whose ``tokenizer.json``
declares exactly GPT-2's byte-level pre-tokenizer, slimline declares ``gpt-2`` instead, and
``smollm`` for digits split off first and then GPT-2's split (the stage then checks the GGUF's
tokenizer against the HF one on real text).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path

from slimline import cache_dir
from slimline.errors import StageError

log = logging.getLogger(__name__)

DISTRIBUTION = "llama-cpp-python"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What conversion needs from the source distribution's vendor/llama.cpp; the C++ sources stay out.
CONVERTER_PARTS = (CONVERTER_SCRIPT, "conversion", "gguf-py", "LICENSE")
INFO_FILE = "converter.json"
UNRECOGNIZED_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"
DECLARED_MARKER = "pre-tokenizer hash unknown to the converter; slimline declares"


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, read without loading its shared library."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def converter_home(version: str) -> Path:
    """The cache folder that holds the converter of llama-cpp-python ``version``."""
    return cache_dir() / f"llama.cpp-{version}"


def fetch_command() -> str:
    """The command that installs the converter, for error messages."""
    return "python -m slimline.quantize.gguf_converter fetch"


def missing_converter() -> list[str]:
    """Why the converter cannot run here (empty when it can): no llama-cpp-python, or not fetched."""
    version = llama_cpp_version()
    if version is None:
        return []  # preflight already names the missing package
    if not (converter_home(version) / INFO_FILE).exists():
        return [f"needs llama.cpp's HF->GGUF converter for llama-cpp-python {version} (run `{fetch_command()}`)"]
    return []


def find_converter() -> Path:
    """The converter folder for the installed llama-cpp-python; StageError with the fix if absent."""
    problems = missing_converter()
    version = llama_cpp_version()
    if version is None:
        raise StageError("quantize.gguf needs llama-cpp-python (pip install 'slimline[gguf]')")
    if problems:
        raise StageError(problems[0])
    return converter_home(version)


def converter_info(folder: Path) -> dict[str, str]:
    """Version, llama.cpp commit and source-distribution hash recorded when the converter was fetched."""
    return json.loads((folder / INFO_FILE).read_text())


# --- fetch ---------------------------------------------------------------------------------


def download_sdist(version: str, folder: Path) -> Path:
    """The llama-cpp-python source distribution of ``version``, through pip (its cache or PyPI)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--dest", str(folder), f"{DISTRIBUTION}=={version}"]
    subprocess.run(command, check=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama_cpp_python sdist in {folder}")
    return found[0]


def unpack_converter(sdist: Path, target: Path, version: str) -> None:
    """Extract the converter parts of ``sdist`` into ``target`` (atomically: a sibling then a rename)."""
    from slimline.artifacts import sha256_file

    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        with tarfile.open(sdist) as archive:
            root = archive.getnames()[0].split("/", 1)[0]
            vendor = f"{root}/vendor/llama.cpp/"
            wanted = [m for m in archive.getmembers() if is_converter_part(m.name, vendor)]
            commit = read_member(archive, f"{root}/.git/modules/vendor/llama.cpp/HEAD")
            for member in wanted:
                member.name = member.name.removeprefix(vendor)
                archive.extract(member, staging, filter="data")
        if not (staging / CONVERTER_SCRIPT).exists():
            raise RuntimeError(f"{sdist} has no vendor/llama.cpp/{CONVERTER_SCRIPT}")
        info = {"llama_cpp_python": version, "llama_cpp_commit": commit, "sdist_sha256": sha256_file(sdist)}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_converter_part(name: str, vendor: str) -> bool:
    """Whether an archive member belongs to the converter."""
    if not name.startswith(vendor):
        return False
    relative = name.removeprefix(vendor)
    return any(relative == part or relative.startswith(part + "/") for part in CONVERTER_PARTS)


def read_member(archive: tarfile.TarFile, name: str) -> str:
    """A small text member of the archive, stripped ('unknown' if absent)."""
    try:
        handle = archive.extractfile(name)
    except KeyError:
        return "unknown"
    return handle.read().decode().strip() if handle else "unknown"


def fetch(sdist: Path | None = None) -> Path:
    """Install the converter matching the installed llama-cpp-python into the cache; return its folder."""
    version = llama_cpp_version()
    if version is None:
        raise SystemExit("llama-cpp-python is not installed: pip install 'slimline[gguf]' first")
    target = converter_home(version)
    if (target / INFO_FILE).exists():
        log.info("converter for llama-cpp-python %s already in %s", version, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sdist is not None and f"-{version}." not in sdist.name:
        raise SystemExit(f"{sdist.name} is not the source of the installed llama-cpp-python {version}")
    with tempfile.TemporaryDirectory() as scratch:
        archive = sdist or download_sdist(version, Path(scratch))
        unpack_converter(archive, target, version)
    log.info("converter for llama-cpp-python %s unpacked into %s", version, target)
    return target


# --- what it supports ----------------------------------------------------------------------


@cache
def supported_architectures(folder: Path) -> frozenset[str]:
    """HF architecture names the converter registers (``@ModelBase.register(...)``), read from its source."""
    names: set[str] = set()
    for path in sorted((folder / "conversion").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and is_register_call(node.func):
                names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
    return frozenset(name for name in names if isinstance(name, str))


def is_register_call(func: ast.expr) -> bool:
    """``ModelBase.register`` (the converter's architecture registry)."""
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "register"
        and isinstance(func.value, ast.Name)
        and func.value.id == "ModelBase"
    )


def declared_pre_tokenizer(model_path: Path) -> str | None:
    """llama.cpp's name for a byte-level BPE ``tokenizer.json`` whose pre-tokenizer is one slimline knows, else None.

    'gpt-2' for exactly GPT-2's byte-level split, 'smollm' for digits isolated first and then GPT-2's split
    (SmolLM's and StarCoder's); see ``slimline.models.gguf_source.DECLARED_NAMES``.
    """
    from slimline.models.gguf_source import declared_name

    path = model_path / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.get("model", {}).get("type") != "BPE" or tokenizer.get("normalizer") is not None:
        return None
    return declared_name(tokenizer.get("pre_tokenizer"))


# --- convert -------------------------------------------------------------------------------


def convert(folder: Path, model_path: Path, outfile: Path, outtype: str, pre_tokenizer: str | None) -> bool:
    """Run the converter on an HF checkpoint in a subprocess; StageError with its message if it fails.

    Returns whether ``pre_tokenizer`` had to be declared (the converter did not know the tokenizer's hash).
    """
    command = [sys.executable, "-m", __name__, "convert", str(folder), str(model_path), str(outfile), outtype]
    if pre_tokenizer:
        command += ["--pre-tokenizer", pre_tokenizer]
    log.info("converting %s to GGUF (%s)", model_path, outtype)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not outfile.exists():
        raise StageError(f"llama.cpp's converter failed on {model_path}: {conversion_error(done.stderr)}")
    return DECLARED_MARKER in done.stderr


def conversion_error(stderr: str) -> str:
    """The useful part of a failed conversion's output."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("**")]
    interesting = [line for line in lines if "Error" in line or "error" in line or "not supported" in line]
    return " | ".join((interesting or lines)[-3:]) or "no message"


def run_converter(folder: Path, model_path: Path, outfile: Path, outtype: str, pre_tokenizer: str | None) -> None:
    """Inside the subprocess: import the converter, declare the pre-tokenizer if asked, run its main()."""
    sys.path.insert(0, str(folder))
    import convert_hf_to_gguf  # the converter's own script; it puts its gguf-py first on sys.path
    from conversion.base import TextModel

    if pre_tokenizer:
        recognise = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return recognise(self, tokenizer)
            except NotImplementedError as error:
                if UNRECOGNIZED_PRE_TOKENIZER not in str(error):
                    raise
                logging.getLogger(__name__).warning("%s %r", DECLARED_MARKER, pre_tokenizer)
                return pre_tokenizer

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [CONVERTER_SCRIPT, str(model_path), "--outfile", str(outfile), "--outtype", outtype]
    convert_hf_to_gguf.main()


def main(argv: list[str] | None = None) -> None:
    """``fetch`` the converter into the cache, or ``convert`` (the subprocess side of ``convert``)."""
    parser = argparse.ArgumentParser(prog="python -m slimline.quantize.gguf_converter")
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="unpack the converter of the installed llama-cpp-python")
    fetching.add_argument("--sdist", type=Path, help="a llama_cpp_python-<version>.tar.gz already downloaded")
    converting = commands.add_parser("convert", help="convert an HF checkpoint (used by the stage)")
    for name in ("folder", "model_path", "outfile"):
        converting.add_argument(name, type=Path)
    converting.add_argument("outtype")
    converting.add_argument("--pre-tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "fetch":
        fetch(args.sdist)
    else:
        run_converter(args.folder, args.model_path, args.outfile, args.outtype, args.pre_tokenizer)


if __name__ == "__main__":
    main()
