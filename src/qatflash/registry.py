"""Registries: one per axis a sweep varies by code (quantization APIs, timing backends, tasks).

Each maps a name to a `module:attribute` string that is imported only when that name is looked
up, so choosing `quant=ptq_dynamic` never imports torchao and `qatflash --help` imports no torch.
A value may also be a `module:attribute` path itself (a class of the user's, named from YAML), and
installed packages can add names through the entry-point group of the registry. Adding a new API,
backend or task is then one module and one line here, or none at all.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from qatflash.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, key: str, builtin: dict[str, str], group: str) -> None:
        self.key = key  # the config key whose values this registry resolves, for refusals
        self.builtin = builtin
        self.group = group
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        """The built-in names, then those installed packages add."""
        added = [ep.name for ep in entry_points(group=self.group) if ep.name not in self.builtin]
        return [*self.builtin, *sorted(added)]

    def _target(self, name: str) -> str:
        if name in self.builtin:
            return self.builtin[name]
        for ep in entry_points(group=self.group):
            if ep.name == name:
                return ep.value
        if ":" in name:
            return name
        raise ConfigError(
            f"{self.key}={name!r} is not allowed; choose one of {self.names()} or give a module:Class path"
        )

    def check(self, name: str) -> None:
        """Refuse a name that is neither registered nor a module:attribute path, without importing it."""
        self._target(name)

    def load(self, name: str) -> T:
        """What `name` stands for, imported now (once)."""
        if name not in self._loaded:
            module, _, attribute = self._target(name).partition(":")
            try:
                self._loaded[name] = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as error:
                raise ConfigError(
                    f"{self.key}={name!r}: cannot import {module}:{attribute} ({error})"
                ) from None
        return self._loaded[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.load(name)(*args, **kwargs)  # type: ignore[operator]
