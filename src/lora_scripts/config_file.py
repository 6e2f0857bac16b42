"""Reading a config: the YAML file and `key=value` overrides into a validated TrainConfig (config.py).

Unknown keys and wrong types become ConfigError lines that name the file, the line and the closest valid key
(`configs/a.yaml:3: lora_rnak: unknown key; did you mean lora_rank?`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_scripts.config import ConfigError, TrainConfig

KNOWN_KEYS = tuple(TrainConfig.model_fields)

def suggest_key(key: str) -> str | None:
    match = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
    return match[0] if match else None


def _key_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every top-level key, read from the YAML node tree."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML so `1e-4`, `true`, `[a, b]` work."""
    if "=" not in item:
        raise ConfigError(f"command line: '{item}' is not key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. `sample_prompts=[Why?]` is not valid YAML: keep the text; validation judges it
    return key, value


def load_config(path: str | Path | None, overrides: list[str] | None = None, **extra: Any) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, and validate strictly.

    Raises ConfigError with one line per problem, e.g.
    `configs/a.yaml:3: lora_rnak: unknown key; did you mean lora_rank?`.
    """
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of key: value lines")
        data.update(loaded)
        where.update({k: f"{path}:{line}" for k, line in _key_lines(text).items()})
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
        where[key] = "command line"
    for key, value in extra.items():
        if value is not None:
            data[key] = value
            where[key] = "command line"

    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where, source)) from None


def _format_errors(exc: ValidationError, where: dict[str, str], source: str) -> str:
    lines = []
    for key, msg in error_messages(exc):
        lines.append(f"{where.get(key, source)}: {msg}")
    return "\n".join(lines)


def error_messages(exc: ValidationError) -> list[tuple[str, str]]:
    """(key, message) per problem; key "" for one about the config as a whole (two keys that contradict)."""
    found = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        key = str(loc[0]) if loc else ""
        if err["type"] == "extra_forbidden":
            hint = suggest_key(key)
            msg = f"{key}: unknown key" + (f"; did you mean {hint}?" if hint else "")
        elif err["type"] == "missing":
            msg = f"{key}: required key is missing"
        elif not key:
            msg = err["msg"].removeprefix("Value error, ")
        else:
            value = err.get("input")
            msg = f"{key}: {err['msg'].removeprefix('Value error, ')} (got {value!r})"
            if isinstance(value, bool) and err["type"] == "literal_error":
                msg += "; YAML reads an unquoted yes/no/on/off/true/false as a boolean: write one of the words above"
        found.append((key, msg))
    return found


def check_values(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The problems of a config given as a mapping (the UI's form), as error_messages gives them; [] if none."""
    try:
        TrainConfig(**values)
    except ValidationError as exc:
        return error_messages(exc)
    return []
