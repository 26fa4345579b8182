"""Fuzzing: bounded hypothesis runs (CI keeps the whole directory under a minute) and a count of the
cases tried per target, printed at the end of the session and written to ``ASAP_FUZZ_REPORT`` if set."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

CASES: Counter[str] = Counter()
"""Cases tried per target (a decoder, or a port and what was sent to it)."""
CRASHES: Counter[str] = Counter()
"""A live service that stopped serving after a case of this target (must stay empty)."""

FUZZ = settings(
    max_examples=int(os.environ.get("ASAP_FUZZ_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="session", autouse=True)
def fuzz_report() -> Iterator[None]:
    yield
    report = {"cases": dict(sorted(CASES.items())), "crashes": dict(CRASHES), "total": sum(CASES.values())}
    print("\nfuzz cases:", json.dumps(report))
    if path := os.environ.get("ASAP_FUZZ_REPORT"):
        with open(path, "w") as out:
            json.dump(report, out, indent=2)
