"""Small frozen settings objects that the domain code takes instead of the config tree."""

from __future__ import annotations

import dataclasses


class Settings:
    """Mixin for a frozen dataclass of settings, cut by name from a config section (or any mapping)."""

    @classmethod
    def of(cls, section, **extra):
        """The fields of the same names from `section`, with `extra` for those the section does not hold."""
        get = section.get if isinstance(section, dict) else lambda name: getattr(section, name)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
        return cls(**{name: get(name) for name in names}, **extra)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
