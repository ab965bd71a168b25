"""QuietWarning: an outage's repeated failure is logged once per interval, with a count of the rest."""

from __future__ import annotations

import logging

import pytest

from gateway.quietlog import QuietWarning


def test_the_first_failure_is_logged_then_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    quiet = QuietWarning(logging.getLogger("test.quiet"), "the store failed", interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.quiet"):
        for _ in range(5):
            quiet.warn(ConnectionError("refused"))
        now[0] += 10
        quiet.warn(ConnectionError("refused again"))
        now[0] += 3
        quiet.warn(ConnectionError("still"))
    assert [r.getMessage() for r in caplog.records] == [
        "the store failed: refused",
        "the store failed: refused again (4 more since the last report)",
    ]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback per request
