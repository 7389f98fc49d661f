"""The run log and the capture of third-party output: Python and C writes leave the terminal for the log."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

import pytest

from slimline.runlog import captured_output, readable_lines, run_log, terminal_stream

pytestmark = pytest.mark.unit


def write_like_a_library(text: str) -> None:
    """Output as third-party code makes it: Python's print, a raw write to fd 2, and C's printf."""
    print(f"{text} from python")  # noqa: T201  (the point: a library's print)
    sys.stdout.flush()
    os.write(2, f"{text} from fd 2\n".encode())
    libc = ctypes.CDLL(None)
    libc.printf(f"{text} from C printf\n".encode())  # buffered by C's stdio until the capture flushes it


def test_captured_output_takes_python_fd_and_c_writes(capfd: pytest.CaptureFixture[str]) -> None:
    with capfd.disabled():  # the real descriptors, as in a terminal session
        with captured_output("noisy", log_now=False) as captured:
            write_like_a_library("chatter")
    assert {"chatter from python", "chatter from fd 2", "chatter from C printf"} <= set(captured.lines)
    terminal = capfd.readouterr()
    assert "chatter" not in terminal.out + terminal.err


def test_captured_output_is_logged_with_its_label(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="slimline")
    with captured_output("stage-a"):
        os.write(2, b"\x1b[32mgreen\x1b[0m banner\nprogress 1/3\rprogress 3/3\n")
    record = next(r for r in caplog.records if r.name == "slimline.runlog")
    assert record.levelno == logging.DEBUG
    assert "[stage-a] green banner\n[stage-a] progress 3/3" in record.getMessage()


def test_output_is_kept_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), captured_output("failing", log_now=False) as captured:
        os.write(1, b"why it failed\n")
        raise RuntimeError("boom")
    assert captured.lines == ["why it failed"]


def test_slimline_output_goes_to_the_saved_terminal_while_captured() -> None:
    outside = terminal_stream()
    with captured_output("x", log_now=False), captured_output("inner", log_now=False):
        inside = terminal_stream()
    assert terminal_stream() is outside
    assert inside is not None


def test_readable_lines_drop_escapes_and_keep_a_redrawn_lines_last_state() -> None:
    raw = b"\x1b[1mbold\x1b[0m\n\nlayer 1/8\rlayer 8/8\r\n  \nend"
    assert readable_lines(raw) == ["bold", "layer 8/8", "end"]
    assert readable_lines(b"bar 1/8\nbar 1/8\n\x1b[1Abar 1/8\nbar 2/8\n") == ["bar 1/8 (repeated 3 times)", "bar 2/8"]


def test_run_log_writes_debug_records_warnings_of_others_and_stray_output(tmp_path: Path) -> None:
    path = tmp_path / "run" / "run.log"
    ours = logging.getLogger("slimline.test")
    with run_log(path):
        ours.debug("a debug detail")
        logging.getLogger("otherlib").warning("a warning of another library")
        os.write(2, b"stray output\n")
        with run_log(path):  # re-entrant: the runner inside the CLI's run log
            ours.info("still one log")
    text = path.read_text()
    for expected in ("DEBUG slimline.test: a debug detail", "otherlib: a warning", "stray output", "still one log"):
        assert expected in text
    assert text.count("still one log") == 1
    ours.debug("after the block")
    assert "after the block" not in path.read_text()
