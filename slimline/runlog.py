"""The run log (``runs/<name>/run.log``) and the capture of third-party output into it.

Libraries slimline drives write to the terminal on their own: gptqmodel its banner and per-layer
tables (from Python and from C), torchao 'Failed to load' lines when it is imported, torch its C++
warnings. ``captured_output`` redirects file descriptors 1 and 2 into a temporary file while such
code runs, so Python and C output alike is caught; the text is then written into the run log as one
DEBUG record whose lines are prefixed with a label (the stage id). slimline's own terminal output
(progress bars, log lines) keeps reaching the real terminal through ``TerminalStream``, which writes
to a copy of the original stderr while a capture is active.

``run_log(path)`` writes the log: slimline's records from DEBUG up (failed stages' tracebacks
included), other libraries' records as far as their loggers' levels allow, and whatever is written
to stdout/stderr during the run that no narrower capture took.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Terminal control sequences (colours, cursor moves) in captured output.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")

# slimline's terminal while captures are active, innermost last (a copy of the stderr they replaced).
_terminals: list[TextIO] = []
# The run logs open now, by path, with their handlers (a runner inside the CLI's run log opens no second one).
_open_logs: dict[Path, logging.Handler] = {}


def run_folder(name: str, out: Path | None) -> Path:
    """The run folder of a pipeline called ``name``: ``out`` if given, else ``runs/<name>``."""
    return (out or Path("runs") / name).resolve()


def terminal_stream() -> TextIO:
    """Where slimline's own output goes now: stderr, or its saved copy while output is captured."""
    return _terminals[-1] if _terminals else sys.stderr


class TerminalStream:
    """A text stream that always writes to slimline's terminal (see ``terminal_stream``); for the CLI's handlers."""

    def write(self, text: str) -> int:
        """Write to the terminal."""
        return terminal_stream().write(text)

    def flush(self) -> None:
        """Flush the terminal."""
        terminal_stream().flush()

    def isatty(self) -> bool:
        """Whether the terminal is a tty (rich decides on bars and colours by it)."""
        return terminal_stream().isatty()

    def fileno(self) -> int:
        """The terminal's file descriptor."""
        return terminal_stream().fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(terminal_stream(), name)


def flush_output() -> None:
    """Flush Python's stdout/stderr buffers and C's stdio buffers, so nothing crosses a redirect late."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or replaced stream has nothing of ours to flush
            stream.flush()
    with contextlib.suppress(Exception):  # no C library to reach (not glibc): Python's buffers were enough
        c_library().fflush(None)


@functools.cache
def c_library() -> ctypes.CDLL:
    """The C library this process runs on (for ``fflush``)."""
    return ctypes.CDLL(None)


def saved_terminal() -> tuple[TextIO, bool]:
    """The stream slimline's output should use during a capture, and whether the caller must close it.

    Inside another capture: that one's terminal. Where stderr is file descriptor 2: a copy of it made
    before the redirect. Otherwise (stderr replaced by a test harness): stderr itself, which the
    redirect does not touch.
    """
    if _terminals:
        return _terminals[-1], False
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr, False
    if descriptor != 2:
        return sys.stderr, False
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return os.fdopen(os.dup(2), "w", buffering=1, encoding=encoding, errors="replace"), True


@contextlib.contextmanager
def redirect_descriptors(sink: BinaryIO) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2, from Python or C, into ``sink`` until the block ends."""
    terminal, owned = saved_terminal()
    flush_output()
    saved = (os.dup(1), os.dup(2))
    _terminals.append(terminal)
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        flush_output()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)
        _terminals.pop()
        if owned:
            terminal.close()


def readable_lines(raw: bytes) -> list[str]:
    """Captured bytes as log lines: escape sequences dropped, a redrawn line (carriage returns) in its last state.

    A progress bar redrawn by cursor moves repeats its line: repeats in a row are kept once, with their count.
    """
    lines: list[str] = []
    repeats = 0
    for line in ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace")).split("\n"):
        text = line.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if text and lines and text == lines[-1].split(" (repeated ", 1)[0]:
            repeats += 1
            lines[-1] = f"{text} (repeated {repeats + 1} times)"
        elif text:
            repeats = 0
            lines.append(text)
    return lines


class RecordBuffer(logging.Handler):
    """Keeps log records for a run log that does not exist yet."""

    def __init__(self) -> None:
        """An empty buffer that takes every record its loggers pass on."""
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record."""
        self.records.append(record)


@dataclass
class CapturedOutput:
    """What third-party code wrote while captured (its lines, logged under ``label``) and, if kept, its log records."""

    label: str
    lines: list[str] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    def log(self) -> None:
        """Hand kept records to the open run logs, then log the lines as one DEBUG record prefixed ``[label]``."""
        for record in self.records:
            for handler in _open_logs.values():
                if record.levelno >= handler.level:
                    handler.handle(record)
        if self.lines:
            body = "\n".join(f"[{self.label}] {line}" for line in self.lines)
            log.debug("%s: output of third-party code (%d lines):\n%s", self.label, len(self.lines), body)


@contextlib.contextmanager
def captured_output(label: str, log_now: bool = True) -> Iterator[CapturedOutput]:
    """Capture what the block writes to stdout/stderr; then log it (``log_now``) or leave it to the caller.

    With ``log_now`` false the block's log records are kept too (torchao reports its failed imports
    as warnings), for ``CapturedOutput.log`` to hand to the run log once it is open. The output is
    kept even when the block raises: it is often what explains the error.
    """
    captured = CapturedOutput(label)
    buffer = RecordBuffer()
    if not log_now:
        logging.getLogger().addHandler(buffer)
    with tempfile.TemporaryFile() as sink:
        try:
            with redirect_descriptors(sink):
                yield captured
        finally:
            logging.getLogger().removeHandler(buffer)
            captured.records = buffer.records
            sink.seek(0)
            captured.lines = readable_lines(sink.read())
            if log_now:
                captured.log()


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Write the block's log into ``path`` (started afresh), slimline's records from DEBUG up.

    For the block's duration the ``slimline`` logger passes DEBUG records (handlers of your own keep
    their levels), and output written to stdout/stderr that no narrower capture took is appended to
    the file as it comes. Re-entrant: inside a block for the same path, nothing more is opened.
    """
    path = path.resolve()
    if path in _open_logs:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # appends: shares the file with the capture
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    ours = logging.getLogger("slimline")
    level = ours.level
    logging.getLogger().addHandler(handler)
    if ours.getEffectiveLevel() > logging.DEBUG:
        ours.setLevel(logging.DEBUG)
    _open_logs[path] = handler
    try:
        with path.open("ab") as sink, redirect_descriptors(sink):
            yield
    finally:
        _open_logs.pop(path, None)
        ours.setLevel(level)
        logging.getLogger().removeHandler(handler)
        handler.close()
