"""Label validation shared by every object that carries labels (containerd's limits)."""

from __future__ import annotations

from runtimed.errors import InvalidArgument

MAX_LABEL_SIZE = 4096


def validate(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label key must not be empty")
        if len(key) + len(value) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label {key[:64]!r}: key and value together exceed {MAX_LABEL_SIZE} bytes"
            )
    return labels


def apply_update(current: dict[str, str], update: dict[str, str], paths: list[str]) -> dict[str, str]:
    """Merge labels by field mask: `labels` replaces all, `labels.<key>` sets or deletes one
    key (deleted when absent or empty in `update`); no mask replaces all."""
    if not paths or "labels" in paths:
        return validate({k: v for k, v in update.items() if v})
    merged = dict(current)
    for path in paths:
        if not path.startswith("labels."):
            continue
        key = path[len("labels."):]
        if update.get(key):
            merged[key] = update[key]
        else:
            merged.pop(key, None)
    return validate(merged)
