"""Every Prometheus metric the gateway exports, on a registry injected per app (no globals).

With several worker processes (`gateway serve --workers N`) the workers share their numbers through
prometheus_client's multiprocess mode: the CLI makes a private directory (`multiprocess_dir`) and
names it in `PROMETHEUS_MULTIPROC_DIR` before the workers start, each worker writes its values to
files there, and `/metrics` merges the files of every worker (`Metrics.exposition`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client import multiprocess as _multiprocess

from gateway.config.schema import MetricsConfig

# Gateway overhead is sub-millisecond: the default buckets start at 5 ms and would hide it.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is first imported
OTHER_USER = "__other__"  # the `user` label of users beyond metrics.max_users, or with a too long name
MAX_USER_LABEL_CHARS = 128
_MAX_CACHED_SERIES = 10_000  # label sets whose counter children are kept at hand; beyond it, start afresh

# prometheus_client's multiprocess helpers, typed.
_collect_files = cast(Callable[[CollectorRegistry, str], object], _multiprocess.MultiProcessCollector)
mark_process_dead = cast(Callable[[int, str], None], _multiprocess.mark_process_dead)

# The token and cost counters' children for one label set: prompt, cached, completion and reasoning
# tokens, cost, unpriced requests.
CostChildren = tuple[Any, Any, Any, Any, Any, Any]


class Metrics:
    """The gateway's metrics, on `registry`.

    `config` adds the opt-in `key` and `user` labels to the token and cost counters. `multiprocess_dir`
    is the directory of prometheus_client's multiprocess mode (one per `gateway serve --workers N`):
    `exposition()` then merges every worker's files instead of reading this registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        config: MetricsConfig | None = None,
        multiprocess_dir: str | None = None,
    ) -> None:
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                f"{MULTIPROC_ENV} must be set before prometheus_client is first imported, so that this process "
                "writes its metrics to files another worker can read"
            )
        config = config or MetricsConfig()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self.requests = Counter(
            "gateway_requests",
            "Proxied API requests, by gateway model and HTTP status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request time, from the first byte in to the last byte out.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time waiting on the upstream, per attempt that answered (to the first chunk for streams).",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself: the request's duration minus the upstream's.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Proxied requests being handled now.",
            registry=self.registry,
            multiprocess_mode="livesum",  # several workers: the sum over the live ones
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Requests whose client went away before the answer was complete.",
            ["endpoint"],
            registry=self.registry,
        )
        # Cost: by tenant and model; a `key` and a `user` label only if the config asks for them, so that
        # cardinality stays bounded by default (and `user` is bounded by max_users when it is on).
        self.per_key = config.labels.key
        self.per_user = config.labels.user
        self.max_users = config.max_users
        cost_labels = ["tenant", "model", *(["key"] if self.per_key else []), *(["user"] if self.per_user else [])]
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens of answered requests, by tenant, gateway model and type (prompt, cached, completion, reasoning).",
            [*cost_labels, "type"],
            registry=self.registry,
        )
        self.cost_usd = Counter(
            "gateway_cost_usd",
            "Cost of answered requests in USD, by tenant and gateway model (unpriced models add nothing).",
            cost_labels,
            registry=self.registry,
        )
        self.unpriced = Counter(
            "gateway_unpriced_requests",
            "Answered requests for a model without a price, by tenant and gateway model.",
            cost_labels,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: time from the request's arrival to its first event sent to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.budget_rejections = Counter(
            "gateway_budget_rejections",
            "Requests refused because a budget was spent, by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused by a rate limit, by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self.budget_alerts = Counter(
            "gateway_budget_alerts",
            "Budgets that crossed their alert_at threshold (once per window), by tenant.",
            ["tenant"],
            registry=self.registry,
        )
        self._users: set[str] = set()
        self._cost_children: dict[tuple[str, ...], CostChildren] = {}

    @property
    def per_caller(self) -> bool:
        """Whether the cost counters carry a `key` or a `user` label."""
        return self.per_key or self.per_user

    def cost_children(self, tenant: str, model: str, key: str = "", user: str | None = None) -> CostChildren:
        """The token and cost counters' children for one answer; `key` and `user` count only if enabled."""
        label_values: tuple[str, ...] = (tenant, model)
        if self.per_key:
            label_values += (key,)
        if self.per_user:
            label_values += (self.user_label(user),)
        children = self._cost_children.get(label_values)
        if children is None:
            if len(self._cost_children) >= _MAX_CACHED_SERIES:
                self._cost_children.clear()  # the series stay in the registry; only this shortcut is dropped
            tokens = self.tokens
            children = self._cost_children[label_values] = (
                tokens.labels(*label_values, "prompt"),
                tokens.labels(*label_values, "cached"),
                tokens.labels(*label_values, "completion"),
                tokens.labels(*label_values, "reasoning"),
                self.cost_usd.labels(*label_values),
                self.unpriced.labels(*label_values),
            )
        return children

    def user_label(self, user: str | None) -> str:
        """The `user` label value: "" for none; the first `max_users` users as themselves, later ones OTHER_USER."""
        if not user:
            return ""
        if user in self._users:
            return user
        if len(user) > MAX_USER_LABEL_CHARS or len(self._users) >= self.max_users:
            return OTHER_USER
        self._users.add(user)
        return user

    def exposition(self) -> bytes:
        """The text for GET /metrics: this registry, or with several workers every worker's files merged."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # fresh per scrape, as prometheus_client's multiprocess mode requires
        _collect_files(registry, self.multiprocess_dir)  # registers itself
        return generate_latest(registry)

    def close(self) -> None:
        """At shutdown: with several workers, drop this worker's live gauges (its counters stay in the sums)."""
        if self.multiprocess_dir is not None:
            with contextlib.suppress(OSError):
                mark_process_dead(os.getpid(), self.multiprocess_dir)


# --- several workers: the directory they share ------------------------------------------------------

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but is someone else's
    return True


def reap_dead_workers(path: str) -> list[int]:
    """Drop the live gauges of worker processes that are gone (killed, crashed); their counters stay.

    A worker that stops cleanly does this itself (`Metrics.close`); this catches the others, which
    uvicorn replaces with new processes.
    """
    try:
        names = os.listdir(path)
    except OSError:
        return []
    pids = {int(match[1]) for name in names if (match := _LIVE_GAUGE_FILE.fullmatch(name))}
    dead = sorted(pid for pid in pids if not _alive(pid))
    for pid in dead:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)
    return dead


@contextlib.contextmanager
def multiprocess_dir(reap_interval_s: float = 1.0) -> Iterator[str]:
    """A fresh private directory for the workers' metric files, removed on exit.

    While it is open, a thread drops the live gauges of workers that died every `reap_interval_s`.
    The caller names the directory in `PROMETHEUS_MULTIPROC_DIR` for the workers it starts.
    """
    path = tempfile.mkdtemp(prefix="gateway-metrics-")  # mode 0700: only this user can read or plant files
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(reap_interval_s):
            reap_dead_workers(path)

    reaper = threading.Thread(target=reap, name="gateway-metrics-reaper", daemon=True)
    reaper.start()
    try:
        yield path
    finally:
        stop.set()
        reaper.join()
        shutil.rmtree(path, ignore_errors=True)
