"""Output for people and for scripts: aligned tables, JSON, and Go-like templates.

`--format json` prints one JSON document per row (docker prints JSON lines too);
`--format '{{.ID}} {{.Image}}'` fills a template per row; `--format 'table {{.ID}}\\t{{.Image}}'`
keeps the header. Templates know `{{.Field}}`, `{{.A.B}}` (dict keys), `{{json .X}}`,
`{{upper .X}}`, `{{lower .X}}`, `{{join .X ","}}`, `{{truncate .X 12}}`, `{{println}}`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime

from runtimed.errors import InvalidArgument

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}")


def _lookup(row, path: str):
    value = row
    for part in filter(None, path.split(".")):
        if isinstance(value, dict):
            if part in value:
                value = value[part]
                continue
            lowered = {k.lower(): v for k, v in value.items() if isinstance(k, str)}
            if part.lower() in lowered:
                value = lowered[part.lower()]
                continue
            return None
        value = getattr(value, part, None)
    return value


def _render_value(value) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_render_value(v)}" for k, v in value.items()) + "]"
    if isinstance(value, list | tuple):
        return "[" + " ".join(_render_value(v) for v in value) + "]"
    return str(value)


def _evaluate(expr: str, row):
    try:
        words = shlex.split(expr)
    except ValueError:
        raise InvalidArgument(f"template: cannot parse {{{{{expr}}}}}") from None
    if not words:
        return ""
    func, args = words[0], words[1:]

    def arg(i: int):
        word = args[i]
        return _lookup(row, word) if word.startswith(".") else word

    if func.startswith("."):
        return _render_value(_lookup(row, func))
    if func == "json":
        return json.dumps(arg(0) if args else row, default=str)
    if func == "upper":
        return _render_value(arg(0)).upper()
    if func == "lower":
        return _render_value(arg(0)).lower()
    if func == "join":
        return str(arg(1)).join(str(v) for v in (arg(0) or []))
    if func == "truncate":
        return _render_value(arg(0))[: int(args[1])]
    if func == "println":
        return " ".join(_render_value(arg(i)) for i in range(len(args))) + "\n"
    raise InvalidArgument(f"template: function {func!r} not defined")


def render_template(template: str, row) -> str:
    text = template.replace("\\t", "\t").replace("\\n", "\n")
    return _ACTION.sub(lambda m: _evaluate(m.group(1), row), text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """docker's table style: columns separated by three spaces, left aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(str(cell)))
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def emit(rows: list[dict], columns: list[tuple[str, str]], fmt: str | None, quiet_key: str | None = None,
         quiet: bool = False) -> str:
    """Rows (dicts keyed by template field names) as a table, JSON lines or a template.

    `columns` is [(header, field)] for the default table.
    """
    if quiet and quiet_key:
        return "\n".join(str(r[quiet_key]) for r in rows)
    if fmt is None or fmt == "" or fmt == "table":
        return table([h for h, _ in columns], [[_cell(r.get(f)) for _, f in columns] for r in rows])
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str, sort_keys=True) for r in rows)
    if fmt.startswith("table"):
        template = fmt[5:].strip()
        header = _ACTION.sub(lambda m: _header(m.group(1)), template.replace("\\t", "\t"))
        body = [render_template(template, r) for r in rows]
        return _align_tabs([header, *body])
    return "\n".join(render_template(fmt, r) for r in rows)


def _header(expr: str) -> str:
    words = expr.split()
    field = next((w for w in words if w.startswith(".")), expr)
    name = field.lstrip(".").split(".")[-1]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).upper()


def _align_tabs(lines: list[str]) -> str:
    split = [line.split("\t") for line in lines]
    width = max((len(r) for r in split), default=0)
    widths = [max((len(r[i]) for r in split if i < len(r)), default=0) for i in range(width)]
    return "\n".join(
        "   ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in split
    )


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value)


def document(obj, fmt: str | None) -> str:
    """One object (inspect): indented JSON by default, or a template."""
    if fmt and fmt != "json":
        return render_template(fmt, obj)
    return json.dumps(obj, indent=4, default=str)


def human_size(n: float) -> str:
    """docker's sizes: decimal units, 3 significant digits (`4.26MB`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}TB"


def binary_size(n: float) -> str:
    """Memory sizes as docker stats shows them: `1.5MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n}TiB"


def human_duration(seconds: float) -> str:
    """docker's `units.HumanDuration`: `Less than a second`, `5 seconds`, `2 hours`."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{h // 24 // 365} years"


def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return ""
    now = now or datetime.now(UTC)
    return human_duration((now - when).total_seconds()) + " ago"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """docker's --since/--until: RFC 3339, a unix timestamp, or a duration (`10m`, `1h30m`)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    match = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:h|m|s|ms))+)", text)
    if match:
        from datetime import timedelta

        total = 0.0
        for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
            total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
        return now - timedelta(seconds=total)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"invalid time {text!r}: use RFC 3339, a unix timestamp or a duration like 10m") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
