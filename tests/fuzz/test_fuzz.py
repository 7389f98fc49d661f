"""Property-based fuzzing of every entry point (see ``targets.py``): nothing escapes, codes from the documented set.

Each target runs twice: a short profile in the default run (``make test``, about a minute in all)
and a long one behind the ``slow`` marker (``pytest -m slow tests/fuzz``); ``benchmarks/fuzz.py``
runs the long profile and records what it tried in ``benchmarks/results/fuzz.md``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.targets import TARGETS, FuzzEnv, Target

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env() -> Iterator[FuzzEnv]:
    fuzz_env = FuzzEnv()
    yield fuzz_env
    fuzz_env.close()


def run_target(target: Target, env: FuzzEnv, examples: int) -> None:
    """Check ``target``'s property on ``examples`` generated cases (no example database: every run fresh)."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(target.strategy)
    def check(value) -> None:
        target.check(env, value)

    check()


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_short(name: str, env: FuzzEnv) -> None:
    run_target(TARGETS[name], env, TARGETS[name].short_examples)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_long(name: str, env: FuzzEnv) -> None:
    run_target(TARGETS[name], env, TARGETS[name].long_examples)
