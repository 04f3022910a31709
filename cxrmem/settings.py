"""Settings: small frozen dataclasses defined beside the code that uses them, and what their values must be.

Each config section is one of these classes, in the module of the code it configures; `cxrmem/config.py`
composes them. A field declares its default with `knob(default, rule or choices)` and its meaning in the
comment after it. `check_section` reads those declarations, and a class's own `check` hook does what one
field cannot (a name against its registry, two fields against each other), so every rule lives beside
its field. Nothing here knows a section or imports the domain.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from typing import Any, Callable, Optional

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


Rule = tuple[Callable[[Any], bool], str]  # (predicate, what the value must be)

POSITIVE: Rule = (lambda v: v is not None and v > 0, "positive")
NON_NEGATIVE: Rule = (lambda v: v is not None and v >= 0, "non-negative")
OPTIONAL_POSITIVE: Rule = (lambda v: v is None or v > 0, "null or positive")
OPTIONAL_NON_NEGATIVE: Rule = (lambda v: v is None or v >= 0, "null or non-negative")
PERCENT: Rule = (lambda v: v is not None and 0 < v <= 100, "in (0, 100]")
UNIT_OPEN: Rule = (lambda v: v is not None and 0 < v < 1, "in (0, 1)")
UNIT_CLOSED: Rule = (lambda v: v is not None and 0 <= v <= 1, "in [0, 1]")
UNIT_HALF_OPEN: Rule = (lambda v: v is not None and 0 <= v < 1, "in [0, 1)")
POSITIVE_LIST: Rule = (lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of positive numbers")


def at_least(bound: float, why: str = "") -> Rule:
    return (lambda v: v is not None and v >= bound, f"at least {bound:g}" + (f" ({why})" if why else ""))


def knob(default: Any, rule: Optional[Rule] = None, choices: Optional[typing.Sequence[str]] = None) -> Any:
    """A settings field: its default, and the rule or the choices its value must meet."""
    metadata = {"rule": rule, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_names(key: str, names: typing.Iterable[str], allowed: typing.Iterable[str], what: str) -> None:
    """Every name of the list at `key` is one of `allowed`, and none twice (a registry checks its own names)."""
    names, allowed = list(names), list(allowed)
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ConfigError(f"config key {key!r}: {unknown[0]!r} is not one of {allowed}")
    if len(set(names)) < len(names):
        raise ConfigError(f"config key {key!r}: {names} names a {what} twice")


def check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"config key {key!r}: {pattern!r} is not a valid regular expression ({err})") from None


def knobs(cls) -> list[tuple[dataclasses.Field, Any]]:
    """The fields of a settings class with their resolved types (annotations are strings under PEP 563)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _nested(kind: Any) -> Optional[type]:
    """The settings class a field holds, directly or as list items (cascade.stages)."""
    if dataclasses.is_dataclass(kind):
        return kind
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (list, tuple, typing.List) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def check_section(section: Any, cls: type, key: str = "") -> None:
    """Check a config section (an OmegaConf node or an instance of `cls`) against `cls`'s declarations:
    each field's rule and choices, nested sections, then `cls.check(section, key)` where a class has one."""
    for f, kind in knobs(cls):
        name = f"{key}.{f.name}" if key else f.name
        value = getattr(section, f.name)
        inner = _nested(kind)
        if inner is not None and dataclasses.is_dataclass(kind):
            check_section(value, inner, name)
        elif inner is not None:
            for i, item in enumerate(value):
                check_section(item, inner, f"{name}[{i}]")
        choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
        if choices is not None and value not in choices:
            raise ConfigError(f"config key {name!r}: {value!r} is not one of {list(choices)}")
        if rule is not None and not rule[0](value):
            raise ConfigError(f"config key {name!r}: {value!r} must be {rule[1]}")
    hook = getattr(cls, "check", None)
    if hook is not None:
        hook(section, key)


class Settings:
    """Mixin for a frozen dataclass of settings, cut by name from a config section (or any mapping)."""

    @classmethod
    def of(cls, section, **extra):
        """The fields of the same names from `section`, with `extra` for those the section does not hold.
        Lists become tuples: a frozen settings object is hashable and compares by value."""
        get = section.get if isinstance(section, dict) else lambda name: getattr(section, name)

        def plain(value):
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            return tuple(value) if isinstance(value, list) else value

        names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
        return cls(**{name: plain(get(name)) for name in names}, **extra)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def with_overrides(cfg, **dotted):
    """A read-only copy of `cfg` with dot-keys replaced (keyword `a__b` is the key `a.b`)."""
    items = [f"{key.replace('__', '.')}={value}" for key, value in dotted.items()]
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    OmegaConf.set_readonly(merged, True)
    return merged


# Credential keys, matched on the whole key name: `model.radedit.tokenizer_max_length` and
# `testbed.max_tokens` are settings, not secrets, and must reach manifests and summaries.
CREDENTIAL_KEY = re.compile(
    r"(aws_)?(access_key_id|secret_access_key|secret_key|session_token|security_token|auth_token|api_key|token|password|secret)",
    re.IGNORECASE,
)


def redact(obj):
    """A copy of a nested dict/list without its credential keys (CREDENTIAL_KEY, whole names only)."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not CREDENTIAL_KEY.fullmatch(str(k))}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def public_config(cfg) -> dict:
    """The resolved configuration as a plain dict without credentials: what manifests and summaries record."""
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return redact(container)
