"""The config page's material, taken from the config model itself so the form can never drift from it:
every key's type, widget, choices, default, family, group and documentation, and a YAML file read and
written as the plain mapping a user edits.

Groups follow the `# ---- what to train ----` headings of TrainConfig's source (the same headings as
configs/lora_default.yaml), so a key added there lands in the right box of the form with no UI change.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lora_scripts.config import TrainConfig, literal_words

HEADING = re.compile(r"^\s*# -{2,} (?P<name>[^-].*?) -{2,}\s*$")
FIELD = re.compile(r"^    (?P<name>[a-z_][a-z0-9_]*)\s*:")


def key_groups() -> dict[str, str]:
    """key -> the heading it sits under in TrainConfig's source."""
    group, found = "other", {}
    for line in inspect.getsource(TrainConfig).splitlines():
        if heading := HEADING.match(line):
            group = heading["name"]
        elif (field := FIELD.match(line)) and field["name"] in TrainConfig.model_fields:
            found[field["name"]] = group
    return found


def widget(annotation: Any) -> str:
    """How the form asks for a value: choice, bool, int, float, list (one per line) or text."""
    if literal_words(annotation):
        return "choice"
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = {a for a in typing.get_args(annotation) if a is not type(None)} if union else {annotation}
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (list, "list")):
        if any(a is kind or typing.get_origin(a) is kind for a in args):
            return name
    return "text"


def config_keys() -> list[dict]:
    """Every config key with what the form needs, in the model's order."""
    from lora_scripts.config_rules import key_family

    groups = key_groups()
    keys = []
    for name, info in TrainConfig.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        keys.append({"name": name, "type": str(info.annotation).replace("typing.", ""),
                     "widget": widget(info.annotation), "choices": list(literal_words(info.annotation)),
                     "default": json.loads(json.dumps(default, default=str)), "required": info.is_required(),
                     "family": key_family(name),
                     "group": groups.get(name, "other"), "doc": info.description or ""})
    return keys


class ConfigFileError(ValueError):
    pass


def read_values(path: Path) -> dict[str, Any]:
    """The mapping a YAML config holds, as written (not validated: the form shows what the file says)."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path.name}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigFileError(f"{path.name}: the config must be a mapping of key: value lines")
    return loaded


def values_yaml(values: dict[str, Any]) -> str:
    """The form's values as YAML, keys in the model's order (unknown ones last, so the error can name them);
    empty values are left out and take their defaults."""
    order = {name: i for i, name in enumerate(TrainConfig.model_fields)}
    kept = {k: v for k, v in values.items() if v is not None and v != "" and v != []}
    ordered = dict(sorted(kept.items(), key=lambda kv: order.get(kv[0], len(order))))
    return "# written by the lora-scripts UI; every key: lora-scripts validate --keys\n" + yaml.safe_dump(
        ordered, sort_keys=False, allow_unicode=True, default_flow_style=False)
