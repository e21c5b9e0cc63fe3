"""Settings dataclasses built from config mappings, with one clear error per bad value."""

from __future__ import annotations

import dataclasses

from .errors import NightstackError


def settings_from_dict(cls, d: dict | None, label: str):
    """Build dataclass ``cls`` from mapping ``d`` (None: defaults).

    Values are coerced to the type of each field's default (bool stays bool, words are
    stripped and lower-cased, whole numbers for int fields); unknown keys or values of the
    wrong kind raise NightstackError naming ``label`` and the key.
    """
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise NightstackError(f"{label} settings must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise NightstackError(f"unknown {label} setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    return cls(**{key: coerce_setting(label, key, value, fields[key].default) for key, value in d.items()})


def coerce_setting(label: str, key: str, value, default):
    """``value`` as the type of ``default``, or NightstackError."""
    try:
        if default is None:  # an optional whole number
            if value is None:
                return None
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value.strip().lower()
        if isinstance(value, bool):
            raise ValueError
        if isinstance(default, int):
            if float(value) != int(value):
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", str: "a word"}.get(type(default), "a number")
        raise NightstackError(f"{label} setting {key}: expected {kind}, got {value!r}") from None
