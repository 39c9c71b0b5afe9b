"""The errors a job refuses or fails with, and how they read in one line. Imports nothing heavy."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input: a one-line message naming the value, why it is refused and what is allowed."""


class UnreadableFileError(ConfigError):
    """A file a run needs is corrupt, truncated or not a plain tensor file."""


def first_line(error: BaseException, with_type: bool = True) -> str:
    """The error as results.json, logs and refusals show it: one line, its type first unless asked not."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    if not with_type:
        return line or type(error).__name__
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def require(ok: bool, message: str) -> None:
    """Refuse with `message` unless `ok`."""
    if not ok:
        raise ConfigError(message)


def one_of(name: str, value: object, allowed: tuple[object, ...] | list[object]) -> None:
    """Refuse `value` for `name` unless it is one of `allowed`, listing them."""
    require(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
