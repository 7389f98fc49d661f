"""Write a local instruction set built from the Python standard library's own functions.

Each record asks about, or asks for, one documented function of the stdlib's *train* split
(the eval split stays unseen): ``{"prompt": ..., "response": ...}``, one JSON object per line.
Two kinds of record, alternating: "What does ``module.name(signature)`` do?" answered by the
docstring's first paragraph, and "Write ``name(signature)``: <summary>" answered by the source.
Deterministic: files in path order, functions in file order.

    python scripts/make_instruction_set.py --out pipelines/data/stdlib_instructions.jsonl --records 1500
"""

from __future__ import annotations

import argparse
import ast
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

from slimline.data import stdlib_documents

MAX_SOURCE_CHARS = 1200


def documented_functions(path: str, text: str) -> Iterator[tuple[str, str, str, str]]:
    """(qualified name, signature, docstring, source) of each documented top-level function or method."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    module = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        source = ast.get_source_segment(text, node)
        if not docstring or not source or len(docstring) < 20:
            continue
        source = textwrap.dedent(" " * node.col_offset + source)  # methods: the body's indentation too
        yield f"{module}.{node.name}", f"{node.name}({ast.unparse(node.args)})", docstring, source


def records(limit: int) -> Iterator[dict[str, str]]:
    """Alternating explain/write records, at most ``limit``."""
    count = 0
    for path, text in sorted(stdlib_documents("train")):
        for name, signature, docstring, source in documented_functions(path, text):
            summary = docstring.strip().split("\n\n")[0].replace("\n", " ")
            if count % 2 == 0:
                yield {"prompt": f"What does `{name.rsplit('.', 1)[0]}.{signature}` do?", "response": summary}
            elif len(source) <= MAX_SOURCE_CHARS:
                yield {"prompt": f"Write `{signature}` in Python: {summary}", "response": source}
            else:
                continue
            count += 1
            if count >= limit:
                return


def main() -> None:
    """Write the records as jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--records", type=int, default=1500)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) for record in records(args.records)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} records -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
