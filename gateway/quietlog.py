"""A warning that repeats on every request during an outage, logged at most once per interval.

store_down = QuietWarning(logger, "the store failed; requests get 503 store_unavailable")
store_down.warn(exc)   # the first at once, then one line per interval counting the rest
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class QuietWarning:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._interval_s = interval_s
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def warn(self, exc: BaseException) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        # The exception's text only: a store's messages never carry a password, and no traceback per request.
        self._logger.warning("%s: %s%s", self._what, exc, more)
        self._next, self._suppressed = now + self._interval_s, 0
