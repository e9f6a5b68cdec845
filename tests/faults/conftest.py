"""The fault suite: real processes, selected with `pytest -m fault`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app import PROJECT_ROOT
from tests.faults.harness import IN_FLIGHT_MODES, Report

REPORT_PATH = PROJECT_ROOT / "test-artifacts" / "reliability.md"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without `-m`, leave the fault scenarios out: the default run stays seconds long.
    Any `-m` (`-m fault`, or the Makefile's `-m ""` for everything) keeps them."""
    args = config.invocation_params.args
    if any(arg == "-m" or arg.startswith("-m") for arg in args):
        return
    keep = [item for item in items if item.get_closest_marker("fault") is None]
    dropped = [item for item in items if item.get_closest_marker("fault") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    collected = Report()
    yield collected
    collected.write(REPORT_PATH)


@pytest.fixture(params=list(IN_FLIGHT_MODES))
def mode(request: pytest.FixtureRequest) -> str:
    """A scenario taking `mode` runs twice: with the default settings, and with several
    mails in flight per worker against a server that delays every reply."""
    return str(request.param)
