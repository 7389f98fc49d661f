"""Reading input slimline does not control: bounded size, bounded nesting, one-line reasons.

Pipeline files, ``--set`` overrides, run folders, artifact manifests, data files and HTTP bodies
all come from outside (a pull request, a downloaded run, a network client). The helpers here read
them in bounded time and memory and turn every way they can be malformed into a ``problem``: a
short sentence the caller wraps in its own error (``ConfigError``, ``ReportError``, a 400).
"""

from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# A JSON string, possibly unterminated (then it runs to the end): possessive, so scanning is linear.
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
OPENERS, CLOSERS = b"[{", b"]}"
NOT_BRACKETS = bytes(b for b in range(256) if b not in OPENERS + CLOSERS)


class UntrustedInputError(ValueError):
    """Input that cannot be read safely; the message says what is wrong, in one line."""


def read_bytes_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, refusing a folder, an unreadable path or more than ``limit`` bytes.

    At most ``limit + 1`` bytes are ever read, so ``/dev/zero`` or a growing file cannot exhaust memory.
    """
    path = Path(path)
    if path.is_dir():
        raise UntrustedInputError(f"{path}: is a folder, expected a {what}")
    if not path.exists():
        raise UntrustedInputError(f"{path}: no such {what}")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise UntrustedInputError(f"{path}: cannot read the {what}: {error.strerror or error}") from error
    if len(data) > limit:
        raise UntrustedInputError(f"{path}: larger than the {limit:,}-byte limit for a {what}")
    return data


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; the error names the first bad byte's offset, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise UntrustedInputError(
            f"{where}:{line}:{column}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "is it a binary file?"
        ) from error


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in JSON text (0 for a scalar), read without parsing it.

    Strings are removed first (brackets inside them do not count), then the running depth is a
    cumulative sum over the remaining brackets: linear in the input, in C loops throughout.
    """
    brackets = JSON_STRING.sub(b"", data).translate(None, NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes | str, where: str, max_depth: int) -> Any:
    """Parse JSON text whose nesting is checked first; every failure is an ``UntrustedInputError``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = json_depth(raw)
    if depth > max_depth:
        raise UntrustedInputError(f"{where}: JSON nested {depth} deep; at most {max_depth} levels are accepted")
    text = decode_utf8(raw, where) if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UntrustedInputError(
            f"{where}:{error.lineno}:{error.colno}: not valid JSON: {error.msg} (truncated or hand-edited?)"
        ) from error
    except RecursionError as error:  # brackets nested inside other brackets the depth scan counted
        raise UntrustedInputError(f"{where}: JSON nested too deeply to parse") from error


def read_json_file(path: Path, limit: int, max_depth: int, what: str = "JSON file") -> Any:
    """A JSON file read with ``read_bytes_bounded`` and parsed with ``parse_json``."""
    return parse_json(read_bytes_bounded(path, limit, what), str(path), max_depth)


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (never built whole), for messages about arbitrary input."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 3, limit, limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(text: str) -> int | None:
    r"""Index of the first lone UTF-16 surrogate in ``text`` (from a JSON ``\ud800`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


class YamlLimitError(yaml.YAMLError):
    """A YAML document over a nesting or alias-expansion bound; ``mark`` says where."""

    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.problem, self.problem_mark = message, mark


class BoundedYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with nesting depth and alias expansion bounded while composing.

    Composing builds the node graph, where an alias is a second reference to an anchored node,
    not a copy. Each node's *expanded* size (itself plus everything under it, aliases counted in
    full) and height are recorded as it is composed, so an alias costs its whole subtree against
    ``max_nodes`` and ``max_depth`` before any Python object exists: the 'billion laughs' shape
    (anchors that repeat the previous anchor nine times, nine deep) is refused after a few
    dozen nodes, and an alias to a node that contains it (a recursive structure) is refused.
    """

    def __init__(self, stream: str, max_depth: int, max_nodes: int) -> None:
        super().__init__(stream)
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self.depth = 0
        self.expanded = 0  # nodes of the document with every alias expanded, so far
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose one node, refusing it if it would push the document over a bound."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self.sizes:
                raise YamlLimitError(f"alias *{event.anchor} refers to a node that contains it", event.start_mark)
            size, height = self.sizes[id(node)]
            self.charge(size, self.depth + height, event.start_mark)
            return node
        self.charge(1, self.depth + 1, event.start_mark)
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self.sizes[id(node)] = subtree_size(node, self.sizes)
        return node

    def charge(self, nodes: int, depth: int, mark: yaml.Mark) -> None:
        """Count ``nodes`` more expanded nodes reaching ``depth``; raise when a bound is passed."""
        if depth > self.max_depth:
            raise YamlLimitError(f"nested more than {self.max_depth} levels deep (aliases expanded)", mark)
        self.expanded += nodes
        if self.expanded > self.max_nodes:
            raise YamlLimitError(
                f"more than {self.max_nodes:,} values with aliases expanded (an alias bomb?)",
                mark,
            )


def subtree_size(node: yaml.Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(expanded size, height) of a composed node from its children's recorded ones."""
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        return 1, 1
    measured = [sizes[id(child)] for child in children]
    return 1 + sum(size for size, _ in measured), 1 + max((height for _, height in measured), default=0)


class YamlValueError(yaml.YAMLError):
    """A value PyYAML's constructors cannot build (``!!int abc``, ``!!float`` with nothing after it)."""


def load_yaml_bounded(text: str, max_depth: int, max_nodes: int) -> tuple[Any, yaml.Node | None]:
    """(Python data, root node) of one YAML document, bounded as ``BoundedYamlLoader`` describes.

    Every failure is a ``yaml.YAMLError``: ``YamlLimitError`` for a bound, ``YamlValueError`` for a
    value the constructors raise on (they raise plain ``ValueError``, ``IndexError``... for tagged
    values that do not fit their tag), PyYAML's own marked errors otherwise.
    """
    loader = BoundedYamlLoader(text, max_depth, max_nodes)
    try:
        root = loader.get_single_node()
        try:
            return (loader.construct_document(root) if root is not None else None), root
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as error:
            raise YamlValueError(" ".join(str(error).split()) or type(error).__name__) from error
    finally:
        loader.dispose()


def yaml_problem(error: Exception) -> str:
    """One line for an error from ``load_yaml_bounded``: ``line:column: not valid YAML: problem`` (or ``refused:``)."""
    if isinstance(error, YamlLimitError):
        mark = error.problem_mark
        return f"{mark.line + 1}:{mark.column + 1}: refused: {error.problem}"
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = " ".join(part for part in (error.context, error.problem) if part) or "syntax error"
        where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "1"
        return f"{where}: not valid YAML: {problem}"
    return f"1: not valid YAML: a value cannot be built (an explicit tag such as !!int on a wrong value?): {error}"
