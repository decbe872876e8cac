"""cgroup v2 device access control: an eBPF program (BPF_PROG_TYPE_CGROUP_DEVICE) built
from the spec's device rules and attached to the cgroup, as runc does.

The program looks at the rules from last to first and returns at the first match (so a
later rule overrides an earlier one, as with v1's devices.allow/deny); no match denies.
Attached without flags, so attaching again (an update) replaces the previous program.
"""

from __future__ import annotations

import ctypes
import os
import struct

_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_NR_BPF = {"x86_64": 321, "aarch64": 280}

_DEV_BLOCK, _DEV_CHAR = 1, 2
_ACC = {"m": 1, "r": 2, "w": 4}

# Instruction opcodes (struct bpf_insn: u8 code, u8 dst:4|src:4, s16 off, s32 imm).
_LDX_W = 0x61
_AND64_K = 0x57
_RSH64_K = 0x77
_MOV64_K = 0xB7
_MOV64_X = 0xBF
_JNE_K = 0x55
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _rule_block(rule: dict) -> list[bytes]:
    """Instructions that return allow/deny when the access matches rule, else fall through."""
    checks: list[tuple[int, int, int]] = []  # (code, register, imm) that must all pass
    kind = rule.get("type", "a") or "a"
    if kind in ("c", "b"):
        checks.append((_JNE_K, 2, _DEV_CHAR if kind == "c" else _DEV_BLOCK))
    access = sum(_ACC[a] for a in (rule.get("access") or "rwm") if a in _ACC)
    block: list[bytes] = []
    if access != 7:
        block += [_insn(_MOV64_X, 6, 3), _insn(_AND64_K, 6, imm=~access & 0xFFFF)]
        checks.append((_JNE_K, 6, 0))
    if rule.get("major") not in (None, -1):
        checks.append((_JNE_K, 4, rule["major"]))
    if rule.get("minor") not in (None, -1):
        checks.append((_JNE_K, 5, rule["minor"]))
    verdict = [_insn(_MOV64_K, 0, imm=1 if rule.get("allow") else 0), _insn(_EXIT)]
    # Each check jumps over the rest of the block (remaining checks + verdict) on mismatch.
    for i, (code, reg, imm) in enumerate(checks):
        block.append(_insn(code, reg, off=len(checks) - i - 1 + len(verdict), imm=imm))
    return block + verdict


def program(rules: list[dict]) -> bytes:
    prologue = [
        _insn(_LDX_W, 2, 1, 0), _insn(_AND64_K, 2, imm=0xFFFF),  # r2 = device type
        _insn(_LDX_W, 3, 1, 0), _insn(_RSH64_K, 3, imm=16),      # r3 = access bits
        _insn(_LDX_W, 4, 1, 4),                                   # r4 = major
        _insn(_LDX_W, 5, 1, 8),                                   # r5 = minor
    ]
    body: list[bytes] = []
    for rule in reversed(rules):
        block = _rule_block(rule)
        body += block
        if len(block) == 2:
            # Matches every access: what comes after is unreachable, which the verifier refuses.
            return b"".join(prologue + body)
    return b"".join(prologue + body + [_insn(_MOV64_K, 0, imm=0), _insn(_EXIT)])


def parse_rule(text: str, allow: bool = True) -> dict:
    """"c 1:3 rwm" (v1 syntax) → a spec rule."""
    kind, numbers, access = text.split()
    major, minor = numbers.split(":")
    return {"allow": allow, "type": kind, "major": None if major == "*" else int(major),
            "minor": None if minor == "*" else int(minor), "access": access}


def attach(cgroup_dir: str, rules: list[dict]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "device rules on cgroup v2 are only implemented for x86_64 and aarch64")
    code = program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(65536)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, _BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log), ctypes.addressof(log))
    prog = libc.syscall(nr, _BPF_PROG_LOAD, attr, 128)
    if prog < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"load the device filter: {os.strerror(err)}: {log.value.decode(errors='replace')[-500:]}")
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attach_attr = ctypes.create_string_buffer(struct.pack("<IIII", cg, prog, _BPF_CGROUP_DEVICE, 0), 32)
            if libc.syscall(nr, _BPF_PROG_ATTACH, attach_attr, 32) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"attach the device filter to {cgroup_dir}: {os.strerror(err)}")
        finally:
            os.close(cg)
    finally:
        os.close(prog)
