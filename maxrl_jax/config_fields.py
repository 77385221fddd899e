"""Dotted config fields, written once: flatten a nested config, apply {"group.field": value} overrides.

    flatten({"objective": {"name": "grpo"}})            -> {"objective.name": "grpo"}
    with_overrides(config, {"objective.name": "grpo"})  -> a copy of config with that field set
"""

from __future__ import annotations

import copy
from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}: the dotted fields of a nested config (a dict or a ConfigDict) or record."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def set_fields(config, overrides: Mapping[str, Any], where: str = "override") -> None:
  """Sets dotted fields of a ConfigDict in place; a ValueError names the field that does not exist or does not
  take the value (`where` says what asked: an override, a population member ...)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    path = "config"
    for part in parents:
      path += f".{part}"
      if part not in node:
        raise ValueError(f"{where} {key!r}: {path} does not exist.")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"{where} {key!r}: {leaf!r} is not a field of {path}.")
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError) as e:
      raise ValueError(f"{where}: cannot set config.{key}={value!r}: {e}") from e


def with_overrides(config, overrides: Mapping[str, Any], where: str = "Override"):
  """A copy of `config` with dotted-key overrides ({"objective.name": "grpo", "seed": 1}) applied."""
  config = copy.deepcopy(config)
  with config.unlocked():
    set_fields(config, overrides, where)
  return config
