"""llama.cpp's log lines, routed into Python logging, with recent warnings and errors kept for messages.

llama.cpp reports why it cannot load or quantize a file only through its log (llama-cpp-python
then raises a bare "failed to load"), and it logs every tensor at INFO. slimline installs one
log callback: everything goes to this module's logger at DEBUG, and the last warnings and errors
are kept so an error message can say what llama.cpp said.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque

log = logging.getLogger(__name__)

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
# llama-cpp-python's own _logger.py still maps the older order (INFO 1 ... DEBUG 4) and so hides errors.
WARN, ERROR, CONT = 3, 4, 5
RECENT_LINES = 12

recent: deque[str] = deque(maxlen=RECENT_LINES)
state: dict[str, object] = {"callback": None, "last_level": 0}


def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """The callback: log at DEBUG; keep warnings and errors (and their continuations)."""
    message = text.decode("utf-8", errors="replace")
    effective = state["last_level"] if level == CONT else level
    state["last_level"] = effective
    if effective in (WARN, ERROR) and message.strip():
        recent.append(message.strip())
    log.debug("%s", message.rstrip())


def capture_llama_cpp_log() -> None:
    """Install the callback (once per process)."""
    if state["callback"] is not None:
        return
    import llama_cpp

    callback = llama_cpp.llama_log_callback(forward)
    state["callback"] = callback  # ctypes must keep it alive for as long as llama.cpp may call it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def take_recent_messages() -> str:
    """llama.cpp's last warnings and errors, joined (and forgotten), or a note that there were none."""
    lines = [line for line in recent if line]
    recent.clear()
    return " | ".join(lines[-4:]) if lines else "llama.cpp logged no warning or error"
