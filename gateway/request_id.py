"""Request ids: the caller's `x-request-id` when it is sane, else a new one."""

from __future__ import annotations

import os
import re

_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(value: str | None) -> str:
    if value is not None and _SAFE.fullmatch(value):
        return value
    return "req_" + os.urandom(12).hex()
