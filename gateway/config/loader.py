"""Read, interpolate, validate and cross-check a config file; fail with `file:key.path: what was expected`."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.schema import GatewayConfig, PriceEntry, PricesFile

Loc = tuple[str | int, ...]

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `file:key.path: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def interpolate(value: Any, env: Mapping[str, str], loc: Loc = ()) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string scalar; `$$` is a literal `$`.

    Interpolating after YAML parsing (not on the raw text) means a variable's value can never
    change the document's structure.
    """
    if isinstance(value, dict):
        return {key: interpolate(item, env, (*loc, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, (*loc, index)) for index, item in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        # As in the shell: `${VAR:-default}` also replaces a variable that is set but empty.
        if default is not None and not value:
            return default
        if value is None:
            raise _UnsetVariable(loc, name)
        return value

    return _VAR.sub(substitute, value)


class _UnsetVariable(Exception):
    def __init__(self, loc: Loc, name: str) -> None:
        self.loc, self.name = loc, name


class _Loader(yaml.SafeLoader):
    """Safe YAML that keeps a date as the text written, so the schema checks it and names its key path."""


def _timestamp_as_text(loader: _Loader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]  # a timestamp is always a scalar node


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def _read_yaml(path: Path, source: str, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the {what}: {exc.strerror or exc}"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{where}: invalid YAML: {problem}"]) from None


def _validation_problems(exc: ValidationError, source: str) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling; see docs/config.md)"
        problems.append(f"{source}:{format_loc(loc)}: {message}")
    return problems


def _reference_problems(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    yield from _model_problems(config)
    yield from _policy_problems(config)
    yield from _tenant_problems(config)


def _model_problems(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    for name, model in config.models.items():
        if model.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams)) or "none defined"
            yield ("models", name, "upstream"), f"unknown upstream {model.upstream!r} (known: {known})"
        for index, fallback in enumerate(model.fallbacks):
            if fallback not in config.models:
                yield ("models", name, "fallbacks", index), f"unknown model {fallback!r}"
            elif fallback == name:
                yield ("models", name, "fallbacks", index), "a model cannot fall back to itself"


def _policy_problems(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    for name, policy in config.policies.items():
        for index, allowed in enumerate(policy.models):
            if allowed != "*" and allowed not in config.models:
                yield ("policies", name, "models", index), f"unknown model {allowed!r}"


def _tenant_problems(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    seen_ids: dict[str, Loc] = {}
    seen_hashes: set[str] = set()
    for tenant_name, tenant in config.tenants.items():
        if tenant.policy not in config.policies:
            known = ", ".join(sorted(config.policies))
            yield ("tenants", tenant_name, "policy"), f"unknown policy {tenant.policy!r} (known: {known})"
        for index, key in enumerate(tenant.api_keys):
            loc: Loc = ("tenants", tenant_name, "api_keys", index)
            if key.id in seen_ids:
                yield (*loc, "id"), f"duplicate key id {key.id!r} (also at {format_loc(seen_ids[key.id])})"
            seen_ids[key.id] = loc
            # Plain keys count too: two tenants sharing a key would authenticate as whichever came last.
            secret = key.key.get_secret_value() if key.key is not None else ""
            digest = key.sha256 or hashlib.sha256(secret.encode()).hexdigest()
            if digest in seen_hashes:
                yield (*loc, "sha256" if key.sha256 else "key"), "the same key is configured twice"
            seen_hashes.add(digest)


def parse_config(data: Any, source: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate an already-parsed YAML document; `source` names it in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping at the top level, got {type(data).__name__}"])
    try:
        data = interpolate(data, os.environ if env is None else env)
    except _UnsetVariable as unset:
        raise ConfigError(
            [
                f"{source}:{format_loc(unset.loc)}: environment variable {unset.name} is not set "
                f"(set it, or give a default with ${{{unset.name}:-default}})"
            ]
        ) from None
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, source)) from None
    problems = [f"{source}:{format_loc(loc)}: {message}" for loc, message in _reference_problems(config)]
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    source = str(path)
    config = parse_config(_read_yaml(Path(path), source, "config file"), source, env)
    check_pricing(config, source)
    return config


# --- prices (pricing.file, prices:, models.*.price; the arithmetic is gateway/cost/prices.py) ----------


def load_prices_file(file: str, base_dir: Path | None = None) -> dict[str, list[PriceEntry]]:
    """Read and validate a prices file.

    A relative `file` is read from `base_dir`, by default the working directory; failing that, from
    the source checkout the gateway runs from (so `config/prices.yaml` is found wherever it starts).
    """
    path = Path(file)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / file
        checkout = Path(__file__).resolve().parents[2] / file
        if base_dir is None and not path.exists() and checkout.exists():
            path = checkout
    data = _read_yaml(path, file, f"prices file (pricing.file, read as {path})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: expected a mapping with a `models:` key, got {type(data).__name__}"])
    try:
        return PricesFile.model_validate(data).models
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, file)) from None


def _unpriced_problems(config: GatewayConfig, file_models: Mapping[str, object]) -> Iterator[tuple[Loc, str]]:
    # The same order as PriceBook: the model's own price, then its name, then its upstream_model.
    priced = {*file_models, *config.prices}
    where = config.pricing.file or "(none)"
    for name, model in config.models.items():
        if model.price is None and name not in priced and (model.upstream_model or name) not in priced:
            message = f"no price for model {name!r}, and pricing.unpriced is 'reject': give it a price:, add it"
            yield ("models", name), f"{message} (or its upstream_model) under prices:, or to the prices file {where}"


def check_pricing(config: GatewayConfig, source: str, base_dir: Path | None = None) -> None:
    """With `pricing.unpriced: reject`, fail at start-up if a configured model has no price at all."""
    if config.pricing.unpriced != "reject":
        return
    file_models = load_prices_file(config.pricing.file, base_dir) if config.pricing.file else {}
    problems = [f"{source}:{format_loc(loc)}: {message}" for loc, message in _unpriced_problems(config, file_models)]
    if problems:
        raise ConfigError(problems)


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("GATEWAY_CONFIG") or "config/gateway.yaml"
