"""Loading a run config: YAML file + `--set dotted.key=value` overrides -> validated `RunConfig`.

The same override mechanism serves the CLI, Tune trials and submitted jobs: a trial or a job is
the base file plus a list of `key=value` strings, nothing else. Every problem becomes one line that
names the field, the value and what is allowed (`ConfigError.problems`); callers print them and
exit with code 2, never a traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.config import RunConfig, cross_check

_MISSING = object()


class ConfigError(ValueError):
    """A user's config mistake: one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3). The value is YAML, so `8`, `true`, `[mlm, itm]`, `null` all work."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {item!r}: expected dotted.key=value, e.g. --set moe.num_experts=8"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {item!r}: value is not valid YAML ({_short(exc)})"]) from None
    except RecursionError:
        raise ConfigError([f"--set {item[:60]!r}...: value nested too deeply"]) from None
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with each dotted override set (`null` sets None, as in YAML)."""
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    problems: list[str] = []
    for key, value in pairs:
        node: Any = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part, _MISSING)
            if child is _MISSING or child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: depth + 1])} = {child!r}: is a value, so "
                                f"{key!r} cannot set a key inside it")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def load_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({_short(exc)})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                           "save the config as UTF-8"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a run config"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it ({exc.strerror or exc})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def validate(raw: Mapping[str, Any]) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_format_error(err, raw) for err in exc.errors()]) from None
    problems = [f"{field} = {value!r}: {allowed}" for field, value, allowed in cross_check(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """YAML file (or defaults when None) + overrides -> validated RunConfig, or ConfigError."""
    try:
        return validate(apply_overrides(load_raw(path), overrides))
    except RecursionError:  # a loadable but absurdly deep tree (copying or validating it recurses)
        raise ConfigError([f"{path}: nested too deeply to be a run config"]) from None


def _format_error(err: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"{field}: unknown key; allowed keys here: {', '.join(allowed)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind in ("model_type", "dict_type") or _is_section(loc):
        # a whole section: its message names the values involved
        return f"{field}: {msg}"
    value = _lookup(raw, loc)
    shown = "(missing)" if value is _MISSING else repr(value)
    return f"{field} = {shown}: {msg}"


def _is_section(loc: list[str]) -> bool:
    node: Any = RunConfig
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return False
        node = fields[part].annotation
    return hasattr(node, "model_fields")


def _allowed_keys(loc: list[str]) -> list[str]:
    node: Any = RunConfig
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        node = fields[part].annotation
    return sorted(getattr(node, "model_fields", {}))


def _lookup(raw: Any, loc: list[str]) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
