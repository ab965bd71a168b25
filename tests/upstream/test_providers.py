from __future__ import annotations

from typing import Any

from gateway.config import UpstreamConfig
from gateway.upstream.providers import AzureProvider, Provider, provider_for


def _config(**fields: Any) -> UpstreamConfig:
    return UpstreamConfig.model_validate({"base_url": "https://api.example.test/v1/", **fields})


def _azure(**fields: Any) -> UpstreamConfig:
    return _config(kind="azure", base_url="https://res.openai.azure.com", api_version="2024-10-21", **fields)


def test_provider_for_picks_by_kind() -> None:
    assert type(provider_for(_config())) is Provider
    assert type(provider_for(_azure())) is AzureProvider


def test_openai_url_is_base_plus_path_and_ignores_the_model() -> None:
    provider = Provider(_config())
    assert provider.url("/chat/completions", "gpt-4o") == "https://api.example.test/v1/chat/completions"
    assert provider.url("/embeddings", "anything") == "https://api.example.test/v1/embeddings"
    assert provider.rewrites_model is True


def test_openai_sends_a_bearer_key_and_json() -> None:
    headers = Provider(_config(api_key="sk-up")).headers({})
    assert headers == {"content-type": "application/json", "authorization": "Bearer sk-up"}


def test_no_api_key_means_no_authorization_header() -> None:
    headers = Provider(_config()).headers({"authorization": "Bearer sk-gw-client"})
    assert "authorization" not in headers


def test_configured_headers_are_sent_lowercased() -> None:
    headers = Provider(_config(headers={"OpenAI-Organization": "org-1", "X-Custom": "v"})).headers({})
    assert headers["openai-organization"] == "org-1"
    assert headers["x-custom"] == "v"


def test_client_headers_are_not_forwarded_by_default() -> None:
    client = {"authorization": "Bearer sk-gw-client", "x-trace-id": "t", "cookie": "c", "host": "gateway"}
    headers = Provider(_config(api_key="sk-up")).headers(client)
    assert headers == {"content-type": "application/json", "authorization": "Bearer sk-up"}


def test_forward_headers_by_exact_name_and_prefix() -> None:
    provider = Provider(_config(api_key="sk-up", forward_headers=["X-Trace-Id", "OpenAI-Beta*"]))
    client = {
        "x-trace-id": "trace-1",
        "x-trace-idx": "no",
        "openai-beta": "assistants=v2",
        "openai-beta-extra": "yes",
        "openai-organization": "no",
        "cookie": "no",
    }
    headers = provider.headers(client)
    assert headers == {
        "content-type": "application/json",
        "authorization": "Bearer sk-up",
        "x-trace-id": "trace-1",
        "openai-beta": "assistants=v2",
        "openai-beta-extra": "yes",
    }


def test_a_forwarded_header_never_replaces_the_gateways_own() -> None:
    provider = Provider(_config(api_key="sk-up", headers={"x-team": "gw"}, forward_headers=["authorization", "x-team"]))
    headers = provider.headers({"authorization": "Bearer sk-gw-client", "x-team": "client"})
    assert headers["authorization"] == "Bearer sk-up"
    assert headers["x-team"] == "gw"


def test_forwarding_does_not_leak_into_later_requests() -> None:
    provider = Provider(_config(api_key="sk-up", forward_headers=["x-trace-id"]))
    assert provider.headers({"x-trace-id": "first"})["x-trace-id"] == "first"
    assert "x-trace-id" not in provider.headers({})
    assert provider.headers({"x-trace-id": "second"})["x-trace-id"] == "second"


def test_azure_url_has_the_quoted_deployment_and_api_version() -> None:
    provider = AzureProvider(_azure())
    assert provider.url("/chat/completions", "my-gpt4o") == (
        "https://res.openai.azure.com/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
    )
    assert provider.url("/embeddings", "a/b c?d") == (
        "https://res.openai.azure.com/openai/deployments/a%2Fb%20c%3Fd/embeddings?api-version=2024-10-21"
    )
    assert provider.rewrites_model is False


def test_azure_authenticates_with_api_key_header() -> None:
    headers = AzureProvider(_azure(api_key="azure-secret")).headers({})
    assert headers == {"content-type": "application/json", "api-key": "azure-secret"}
