"""Capability sets: names from the spec to bit numbers, and applying all five sets."""

from __future__ import annotations

from shimd.oci import linux

NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
_NUMBERS = {f"CAP_{name}": i for i, name in enumerate(NAMES)}


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(NAMES) - 1


def mask(names: list[str] | None, last: int) -> int:
    """Bit mask of the named capabilities; unknown or too new ones are ignored, as runc does."""
    bits = 0
    for name in names or ():
        n = _NUMBERS.get(name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}")
        if n is not None and n <= last:
            bits |= 1 << n
    return bits


def drop_bounding(keep: int, last: int) -> None:
    for n in range(last + 1):
        if not keep & (1 << n):
            linux.prctl(linux.PR_CAPBSET_DROP, n)


def apply(spec_caps: dict | None, last: int) -> None:
    """Set effective, permitted, inheritable, then raise ambient (needs P and I to hold it)."""
    spec_caps = spec_caps or {}
    linux.capset(mask(spec_caps.get("effective"), last), mask(spec_caps.get("permitted"), last),
                 mask(spec_caps.get("inheritable"), last))
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    ambient = mask(spec_caps.get("ambient"), last)
    for n in range(last + 1):
        if ambient & (1 << n):
            try:
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, n)
            except OSError:
                pass  # not in permitted and inheritable: runc warns and carries on
