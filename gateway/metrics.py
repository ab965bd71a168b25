"""Every Prometheus metric the gateway exports, on a registry injected per app (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Gateway overhead is sub-millisecond: the default buckets start at 5 ms and would hide it.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
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
            "gateway_in_flight_requests", "Proxied requests being handled now.", registry=self.registry
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Requests whose client went away before the answer was complete.",
            ["endpoint"],
            registry=self.registry,
        )
        # Cost: labelled by tenant and model only, so cardinality stays bounded (no key or user labels).
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens of answered requests, by tenant, gateway model and type (prompt, cached, completion, reasoning).",
            ["tenant", "model", "type"],
            registry=self.registry,
        )
        self.cost_usd = Counter(
            "gateway_cost_usd",
            "Cost of answered requests in USD, by tenant and gateway model (unpriced models add nothing).",
            ["tenant", "model"],
            registry=self.registry,
        )
        self.unpriced = Counter(
            "gateway_unpriced_requests",
            "Answered requests for a model without a price, by tenant and gateway model.",
            ["tenant", "model"],
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
