"""Record the command-line flags of vLLM and llama-server that the deployment bundles may use.

``slimline/serve/deploy.py`` writes ``vllm serve`` and ``llama-server`` command lines; the tests
check every flag they write against the two files this script produces from the engines' own
source, read statically (neither engine is installed to do it):

* ``slimline/serve/vllm_flags.json`` from an unpacked vLLM source distribution: the ``--flags``
  that ``vllm serve``'s parser registers (``make_arg_parser`` in
  ``vllm/entrypoints/common/cli_args.py``, the frontend dataclasses' fields, ``EngineArgs.add_cli_args``
  in ``vllm/engine/arg_utils.py``), the ``SpeculativeConfig`` fields and the ``SpeculativeMethod``
  literals (``vllm/config/speculative.py``), and the ``--dtype`` choices (``vllm/config/model.py``).
* ``slimline/serve/llama_server_flags.json`` from llama.cpp's ``common/arg.cpp`` (the source that
  llama-cpp-python's sdist vendors): every option registered for the server example (or common to
  all examples) and not removed, and the ``--spec-type`` names (``common/speculative.cpp``).

    pip download vllm==0.33.0 --no-deps --no-binary :all:   # or fetch the .tar.gz; unpack it
    python scripts/record_serving_flags.py --vllm vllm-0.33.0 --vllm-sdist vllm-0.33.0.tar.gz \
        --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp --llama-cpp-python 0.3.36 \
        --llama-cpp-sdist llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
from pathlib import Path

SERVE_FOLDER = Path(__file__).resolve().parent.parent / "slimline" / "serve"


# --- vLLM ------------------------------------------------------------------------------------


def parse(path: Path) -> ast.Module:
    """The module's syntax tree."""
    return ast.parse(path.read_text(), filename=str(path))


def add_argument_flags(tree: ast.Module) -> set[str]:
    """Literal option strings of every ``<parser or group>.add_argument(...)`` call."""
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            for argument in node.args:
                if isinstance(argument, ast.Constant) and str(argument.value).startswith("-"):
                    flags.add(argument.value)
    return flags


def class_fields(tree: ast.Module, name: str) -> dict[str, str]:
    """``{field: annotation source}`` of the annotated fields in class ``name``'s body."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise SystemExit(f"class {name} not found")


def frontend_flags(tree: ast.Module) -> set[str]:
    """``--field`` (and ``--no-field`` for booleans) of FrontendArgs and its base, as get_kwargs makes them."""
    flags = set()
    for name in ("BaseFrontendArgs", "FrontendArgs"):
        for field, annotation in class_fields(tree, name).items():
            flag = "--" + field.replace("_", "-")
            flags.add(flag)
            if annotation == "bool":  # argparse.BooleanOptionalAction
                flags.add("--no-" + flag[2:])
    return flags


def literal_values(tree: ast.Module, name: str) -> list[str]:
    """The strings of a ``Name = Literal[...]`` alias, following aliases it names."""
    aliases = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }
    values: list[str] = []

    def collect(node: ast.expr) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            values.append(node.value)
        elif isinstance(node, ast.Name):
            collect(aliases[node.id])
        elif isinstance(node, ast.Subscript):  # Literal[...]
            collect(node.slice)
        elif isinstance(node, ast.Tuple):
            for element in node.elts:
                collect(element)

    collect(aliases[name])
    return values


def version_and_commit(source: Path) -> tuple[str, str]:
    """The release and commit that vcs-versioning wrote into ``vllm/_version.py`` when the sdist was built."""
    text = (source / "vllm" / "_version.py").read_text()
    version = re.search(r"__version__ = version = '([^']+)'", text).group(1)
    commit = re.search(r"__commit_id__ = commit_id = '([^']+)'", text).group(1)
    return version, commit.removeprefix("g")


def vllm_record(source: Path, sdist: Path | None) -> dict:
    """vllm_flags.json's content."""
    version, commit = version_and_commit(source)
    cli_args = parse(source / "vllm" / "entrypoints" / "common" / "cli_args.py")
    engine_args = parse(source / "vllm" / "engine" / "arg_utils.py")
    speculative = parse(source / "vllm" / "config" / "speculative.py")
    flags = add_argument_flags(cli_args) | frontend_flags(cli_args) | add_argument_flags(engine_args)
    return {
        "release": f"v{version}",
        "commit": commit,
        "commit_note": "abbreviated hash, as vcs-versioning recorded it in the sdist's vllm/_version.py",
        "sdist": f"vllm-{version}.tar.gz",
        "sdist_sha256": sha256(sdist) if sdist else None,
        "produced_by": "scripts/record_serving_flags.py",
        "sources": [
            "vllm/entrypoints/common/cli_args.py (make_arg_parser, BaseFrontendArgs, FrontendArgs)",
            "vllm/engine/arg_utils.py (EngineArgs.add_cli_args, AsyncEngineArgs.add_cli_args)",
            "vllm/config/speculative.py (SpeculativeConfig, SpeculativeMethod)",
            "vllm/config/model.py (ModelDType)",
        ],
        "flags": sorted(flags),
        "speculative_config_fields": sorted(class_fields(speculative, "SpeculativeConfig")),
        "speculative_methods": sorted(set(literal_values(speculative, "SpeculativeMethod"))),
        "dtype_choices": literal_values(parse(source / "vllm" / "config" / "model.py"), "ModelDType"),
    }


# --- llama.cpp -------------------------------------------------------------------------------


def option_blocks(text: str) -> list[str]:
    """The source of each ``add_opt(common_arg(...))`` call, parentheses balanced (strings skipped)."""
    blocks = []
    for match in re.finditer(r"add_opt\(common_arg\(", text):
        depth, index, quote = 0, match.start() + len("add_opt"), None
        while True:
            char = text[index]
            if quote:
                if char == "\\":
                    index += 1
                elif char == quote:
                    quote = None
            elif text.startswith("//", index):  # a comment may hold an apostrophe
                index = text.index("\n", index)
            elif char in "\"'":
                quote = char
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    break
            index += 1
        blocks.append(text[match.start() : index + 1])
    return blocks


def example_lists(text: str) -> dict[str, set[str]]:
    """Named ``std::initializer_list<enum llama_example>`` variables (``mmproj_examples``)."""
    pattern = r"std::initializer_list<enum llama_example>\s+(\w+)\s*=\s*\{([^}]*)\}"
    return {name: set(re.findall(r"LLAMA_EXAMPLE_\w+", body)) for name, body in re.findall(pattern, text)}


def examples_of(block: str, method: str, named: dict[str, set[str]]) -> set[str] | None:
    """The examples a ``.set_examples``/``.set_excludes`` call names, or None without one."""
    match = re.search(rf"\.{method}\(\s*(\{{[^}}]*\}}|\w+)\s*\)", block)
    if match is None:
        return None
    argument = match.group(1)
    return set(re.findall(r"LLAMA_EXAMPLE_\w+", argument)) if argument.startswith("{") else named[argument]


def option_names(block: str) -> list[str]:
    """The option strings of a ``common_arg``: its leading ``{"-x", "--xx"}`` lists (positive, then negative)."""
    head = re.sub(r"^\s*//[^\n]*", "", block[len("add_opt(common_arg(") :], flags=re.M)  # leading comments
    names: list[str] = []
    while match := re.match(r"\s*\{([^{}]*)\}\s*,", head):
        strings = re.findall(r'"([^"]+)"', match.group(1))
        if not strings or not all(s.startswith("-") for s in strings):
            break
        names += strings
        head = head[match.end() :]
    return names


def server_flags(arg_cpp: str) -> tuple[list[str], list[str]]:
    """(flags llama-server accepts, flags it registers only to refuse as removed)."""
    named = example_lists(arg_cpp)
    accepted, removed = set(), set()
    for block in option_blocks(arg_cpp):
        examples = examples_of(block, "set_examples", named) or {"LLAMA_EXAMPLE_COMMON"}
        excludes = examples_of(block, "set_excludes", named) or set()
        if not examples & {"LLAMA_EXAMPLE_SERVER", "LLAMA_EXAMPLE_COMMON"} or "LLAMA_EXAMPLE_SERVER" in excludes:
            continue
        (removed if "arg_removed(" in block else accepted).update(option_names(block))
    return sorted(accepted), sorted(removed - accepted)


def llama_server_record(source: Path, version: str, sdist: Path | None) -> dict:
    """llama_server_flags.json's content."""
    accepted, removed = server_flags((source / "common" / "arg.cpp").read_text())
    speculative = (source / "common" / "speculative.cpp").read_text()
    table = re.search(r"common_speculative_type_from_name_map = \{(.*?)\};", speculative, re.S).group(1)
    return {
        "llama_cpp_python": version,
        "llama_cpp_commit": llama_cpp_commit(sdist),
        "sdist": f"llama_cpp_python-{version}.tar.gz",
        "sdist_sha256": sha256(sdist) if sdist else None,
        "produced_by": "scripts/record_serving_flags.py",
        "sources": ["vendor/llama.cpp/common/arg.cpp", "vendor/llama.cpp/common/speculative.cpp"],
        "flags": accepted,
        "removed_flags": removed,
        "spec_types": re.findall(r'\{"([a-z0-9-]+)",', table),
    }


def llama_cpp_commit(sdist: Path | None) -> str | None:
    """The vendored llama.cpp commit, from the sdist's git metadata (as gguf_converter.fetch reads it)."""
    if sdist is None:
        return None
    import tarfile

    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        member = archive.extractfile(f"{root}/.git/modules/vendor/llama.cpp/HEAD")
        return member.read().decode().strip() if member else None


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Write both JSON files beside deploy.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", type=Path, required=True, help="unpacked vLLM sdist")
    parser.add_argument("--vllm-sdist", type=Path, help="the vLLM .tar.gz, to record its sha256")
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (the sdist's vendor/llama.cpp)")
    parser.add_argument("--llama-cpp-python", required=True, help="llama-cpp-python version that vendors it")
    parser.add_argument("--llama-cpp-sdist", type=Path, help="llama-cpp-python's .tar.gz (commit and sha256)")
    args = parser.parse_args()
    records = {
        "vllm_flags.json": vllm_record(args.vllm, args.vllm_sdist),
        "llama_server_flags.json": llama_server_record(args.llama_cpp, args.llama_cpp_python, args.llama_cpp_sdist),
    }
    for name, record in records.items():
        (SERVE_FOLDER / name).write_text(json.dumps(record, indent=1) + "\n")
        print(f"{SERVE_FOLDER / name}: {len(record['flags'])} flags")


if __name__ == "__main__":
    main()
