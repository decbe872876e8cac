"""Command implementations; each module is imported only when one of its commands runs."""

from __future__ import annotations

import sys

EXIT_DAEMON = 125


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line for the user and docker's exit code."""
    from runtimed.errors import RuntimedError

    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):  # a container result (ExitCode) carries its own status
        return str(exc), code
    if isinstance(exc, RuntimedError):
        return str(exc) or type(exc).__name__, EXIT_DAEMON
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}", EXIT_DAEMON
    return f"{type(exc).__name__}: {exc}", EXIT_DAEMON


def client(args):
    """The library client for the global --address/--namespace (imports grpc now)."""
    cached = getattr(args, "_client", None)
    if cached is None:
        from ctl.client import Client

        cached = Client(args.address, args.namespace)
        args._client = cached
    return cached


def out(text: str) -> None:
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def out_documents(docs: list, fmt: str | None) -> None:
    """`inspect` output: a JSON array by default, or each document through a template."""
    from ctl.format import document

    if fmt and fmt != "json":
        for d in docs:
            out(document(d, fmt))
    else:
        out(document(docs, None))


def err(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def parse_labels(items: list[str]) -> dict[str, str]:
    from runtimed.errors import InvalidArgument

    labels = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels
