"""How each kind of upstream wants a request addressed and authenticated."""

from __future__ import annotations

from urllib.parse import quote

from gateway.config.schema import UpstreamConfig


class Provider:
    """Kind `openai`: any OpenAI-compatible base URL (OpenAI, vLLM, Ollama, another gateway)."""

    # The deployment stands in the URL for Azure; OpenAI-compatible servers need the body's `model`.
    rewrites_model = True

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._headers = {
            "content-type": "application/json",
            **{k.lower(): v for k, v in config.headers.items()},
        }
        key = config.api_key.get_secret_value()
        if key:
            self._headers.update(self._auth_headers(key))
        self._forward_exact = frozenset(n for n in config.forward_headers if not n.endswith("*"))
        self._forward_prefixes = tuple(n[:-1] for n in config.forward_headers if n.endswith("*"))

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def url(self, path: str, upstream_model: str) -> str:
        return self.config.base_url + path

    def headers(self, client_headers: dict[str, str]) -> dict[str, str]:
        if not (self._forward_exact or self._forward_prefixes):
            return self._headers
        headers = dict(self._headers)
        for name, value in client_headers.items():
            if name in self._forward_exact or name.startswith(self._forward_prefixes):
                headers.setdefault(name, value)
        return headers


class AzureProvider(Provider):
    """Kind `azure`: Azure OpenAI deployments, `api-version` query and `api-key` header."""

    rewrites_model = False

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"api-key": key}

    def url(self, path: str, upstream_model: str) -> str:
        deployment = quote(upstream_model, safe="")
        return f"{self.config.base_url}/openai/deployments/{deployment}{path}?api-version={self.config.api_version}"


def provider_for(config: UpstreamConfig) -> Provider:
    return AzureProvider(config) if config.kind == "azure" else Provider(config)
