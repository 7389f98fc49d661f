"""Progress reporting for long steps: the library asks for a task, the CLI decides how to show it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

Advance = Callable[[int], None]


class Progress:
    """Shows nothing; logs one line when a task finishes. The CLI swaps in rich bars."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A unit of work of ``total`` steps; yields the function that advances it."""
        started = time.perf_counter()
        yield lambda n=1: None
        log.info("%s: done in %.1fs", description, time.perf_counter() - started)
