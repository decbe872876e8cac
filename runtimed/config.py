"""Daemon configuration: defaults, a TOML file with the same keys as the flags, flags last."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from runtimed.errors import InvalidArgument


@dataclass
class Config:
    address: str = "/run/runtimed/runtimed.sock"
    root: str = "/var/lib/runtimed"
    state: str = "/run/runtimed"
    log_level: str = "info"
    log_format: str = "text"
    # group that may use the socket (mode 0660); empty keeps root's group
    socket_group: str = ""
    # per-registry-host settings: {"localhost:5000": {"insecure": true, "ca": "...", "mirrors": [...]}}
    registries: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None, **overrides) -> Config:
        values: dict = {}
        if path:
            try:
                with open(path, "rb") as f:
                    values = tomllib.load(f)
            except FileNotFoundError:
                raise InvalidArgument(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise InvalidArgument(f"config file {path}: {exc}") from None
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = set(values) - known
        if unknown:
            raise InvalidArgument(f"config file {path}: unknown keys {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def state_path(self) -> Path:
        return Path(self.state)
