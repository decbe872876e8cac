"""What the torture suite tried, for the summary `make soak` prints at its end."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()

# the order and wording of the summary line
LABELS = {
    "crashes": "crashes injected",
    "inputs": "inputs tried",
    "lifecycles": "lifecycles run",
    "netops": "network operations",
    "leaks": "leaks found",
}


def record(kind: str, n: int = 1) -> None:
    COUNTS[kind] += n


def summary() -> str:
    return ", ".join(f"{label}: {COUNTS[kind]}" for kind, label in LABELS.items())
