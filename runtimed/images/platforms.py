"""Platforms (`linux/amd64/v2`, `linux/arm64`): parsing, normalising and matching.

Follows containerd's rules so an index resolves to the same manifest here as there: names
are normalised (`x86_64` → `amd64`, `aarch64` → `arm64`, `armhf` → `arm/v7`), and the host
default also accepts what the host can run: `amd64/v3` runs v2, v1 and 386 images, `arm64`
runs `arm/v8` down to `arm/v5`, ordered by preference.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Protocol

from runtimed.errors import InvalidArgument

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_KNOWN_OS = frozenset(
    "aix android darwin dragonfly freebsd hurd illumos ios js linux nacl netbsd openbsd "
    "plan9 solaris windows zos".split()
)
_KNOWN_ARCH = frozenset(
    "386 amd64 amd64p32 arm armbe arm64 arm64be ppc64 ppc64le loong64 mips mipsle mips64 "
    "mips64le mips64p32 mips64p32le ppc riscv riscv64 s390 s390x sparc sparc64 wasm".split()
)


@dataclass(frozen=True)
class Platform:
    """The OCI platform object; `variant` is '' when absent."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return format(self)

    def to_json(self) -> dict:
        """The OCI JSON object (keys `os.version`, `os.features` as the spec spells them)."""
        out: dict = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, obj: object) -> Platform:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"platform must be a JSON object, got {type(obj).__name__}")
        fields = {}
        for key, name in (("os", "os"), ("architecture", "architecture"),
                          ("variant", "variant"), ("os.version", "os_version")):
            value = obj.get(key, "")
            if not isinstance(value, str):
                raise InvalidArgument(f"platform field {key!r} must be a string")
            fields[name] = value
        features = obj.get("os.features") or []
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise InvalidArgument("platform field 'os.features' must be a list of strings")
        return cls(os_features=tuple(features), **fields)


def format(platform: Platform) -> str:
    """`os/arch[/variant]`, as containerd's platforms.Format."""
    if not platform.os:
        return "unknown"
    return "/".join(p for p in (platform.os, platform.architecture, platform.variant) if p)


def normalize(platform: Platform) -> Platform:
    arch, variant = _normalize_arch(platform.architecture, platform.variant)
    return replace(platform, os=_normalize_os(platform.os), architecture=arch, variant=variant)


def parse(specifier: str) -> Platform:
    """`linux`, `amd64`, `linux/arm64`, `linux/amd64/v2` → a normalised Platform.

    A lone OS takes the host architecture, a lone architecture the host OS.
    """
    if "*" in specifier:
        raise InvalidArgument(f"{specifier!r}: wildcards are not supported in platforms")
    parts = specifier.split("/")
    for part in parts:
        if not _COMPONENT_RE.fullmatch(part):
            raise InvalidArgument(
                f"{part!r} is an invalid component of platform {specifier!r}: "
                "each component must match [A-Za-z0-9_-]+"
            )
    if len(parts) == 1:
        os_name = _normalize_os(parts[0])
        if os_name in _KNOWN_OS:
            host = host_default()
            variant = host.variant if host.architecture == "arm" and host.variant != "v7" else ""
            return Platform(os_name, host.architecture, variant)
        arch, variant = _normalize_arch(parts[0], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        if arch in _KNOWN_ARCH:
            return Platform("linux", arch, variant)
        raise InvalidArgument(f"{specifier!r}: unknown operating system or architecture")
    if len(parts) == 2:
        arch, variant = _normalize_arch(parts[1], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        return Platform(_normalize_os(parts[0]), arch, variant)
    if len(parts) == 3:
        arch, variant = _normalize_arch(parts[1], parts[2])
        return Platform(_normalize_os(parts[0]), arch, variant)
    raise InvalidArgument(f"{specifier!r}: cannot parse platform, expected os[/arch[/variant]]")


@cache
def host_default() -> Platform:
    """The platform of this machine (`linux/amd64`, `linux/arm/v7`, ...)."""
    arch, variant = _normalize_arch(os.uname().machine or "amd64", "")  # platform.machine(), unimported
    if arch in ("arm", "arm64"):
        variant = _arm_variant(arch) or variant
        arch, variant = _normalize_arch(arch, variant)
    return Platform("linux", arch, variant)


class Matcher(Protocol):
    """Decides whether a platform is acceptable and which of two is preferred."""

    def match(self, platform: Platform) -> bool: ...

    def less(self, a: Platform, b: Platform) -> bool: ...


def _same(a: Platform, b: Platform) -> bool:
    a, b = normalize(a), normalize(b)
    return (a.os, a.architecture, a.variant) == (b.os, b.architecture, b.variant)


@dataclass(frozen=True)
class Ordered:
    """Matches any of `platforms`; earlier ones are preferred."""

    platforms: tuple[Platform, ...]

    def match(self, platform: Platform) -> bool:
        return any(_same(p, platform) for p in self.platforms)

    def less(self, a: Platform, b: Platform) -> bool:
        for p in self.platforms:
            am, bm = _same(p, a), _same(p, b)
            if am and not bm:
                return True
            if am or bm:
                return False
        return False

    def __str__(self) -> str:
        return ", ".join(format(p) for p in self.platforms)


class _All:
    def match(self, platform: Platform) -> bool:
        return True

    def less(self, a: Platform, b: Platform) -> bool:
        return False

    def __str__(self) -> str:
        return "all platforms"


ALL: Matcher = _All()


def only(platform: Platform) -> Ordered:
    """`platform` and everything a machine of that platform also runs, best first."""
    return Ordered(tuple(_vector(normalize(platform))))


def only_strict(platform: Platform) -> Ordered:
    return Ordered((normalize(platform),))


def default() -> Ordered:
    """What this host runs, as containerd's `platforms.Default()`."""
    return only(host_default())


def sort_best_first(matcher: Matcher, platforms: Iterable[Platform]) -> list[Platform]:
    def cmp(a: Platform, b: Platform) -> int:
        return -1 if matcher.less(a, b) else (1 if matcher.less(b, a) else 0)

    return sorted(platforms, key=functools.cmp_to_key(cmp))


def _vector(p: Platform) -> list[Platform]:
    out = [p]
    if p.architecture == "amd64":
        level = _version(p.variant)
        if level and level > 1:
            out += [replace(p, variant="" if v == 1 else f"v{v}") for v in range(level - 1, 0, -1)]
        out.append(replace(p, architecture="386", variant=""))
    elif p.architecture == "arm":
        level = _version(p.variant)
        if level and level > 5:
            out += [replace(p, variant=f"v{v}") for v in range(level - 1, 4, -1)]
    elif p.architecture == "arm64":
        out += _vector(replace(p, architecture="arm", variant=p.variant or "v8"))
    return out


def _version(variant: str) -> int | None:
    try:
        return int(variant.removeprefix("v"))
    except ValueError:
        return None


def _normalize_os(name: str) -> str:
    name = name.lower() if name else "linux"
    return "darwin" if name == "macos" else name


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("8", "v8") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


def _arm_variant(arch: str) -> str:
    """The ARM variant from /proc/cpuinfo's `CPU architecture` (as containerd reads it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() == "cpu architecture":
                    value = value.strip()
                    break
            else:
                return ""
    except OSError:
        return ""
    if arch == "arm64":
        return "v8"
    return {"7": "v7", "6": "v6", "5": "v5", "8": "v8"}.get(value[:1], "") if value else ""

