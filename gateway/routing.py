"""Pure routing: a gateway model name to the upstream targets to try, in order. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.schema import GatewayConfig


@dataclass(slots=True, frozen=True)
class Target:
    model: str  # the gateway's model name (a key under `models:`)
    upstream: str
    upstream_model: str  # the name the upstream knows it by (or the Azure deployment)


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._routes: dict[str, tuple[Target, ...]] = {name: self._chain(config, name) for name in config.models}

    @staticmethod
    def _chain(config: GatewayConfig, name: str) -> tuple[Target, ...]:
        """The model, then its fallbacks depth-first, each model once (so cycles end)."""
        seen: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            if current in seen:
                continue
            seen.append(current)
            pending[:0] = config.models[current].fallbacks
        return tuple(
            Target(model, config.models[model].upstream, config.models[model].upstream_model or model) for model in seen
        )

    def __contains__(self, model: str) -> bool:
        return model in self._routes

    def targets(self, model: str) -> tuple[Target, ...]:
        return self._routes[model]

    @property
    def models(self) -> list[str]:
        return list(self._routes)
