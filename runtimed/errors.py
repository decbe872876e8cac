"""Typed errors raised by core code; `runtimed.services.base` maps them to gRPC codes once.

Each class names the gRPC status code it stands for, so the server maps an exception to a
status and the client library maps a status back to the same exception type without a
second table. This module does not import grpc: the command line must start fast.
"""

from __future__ import annotations


class RuntimedError(Exception):
    """Base of every error that crosses the API; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"


class NotFound(RuntimedError):
    code = "NOT_FOUND"


class AlreadyExists(RuntimedError):
    code = "ALREADY_EXISTS"


class InvalidArgument(RuntimedError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(RuntimedError):
    code = "FAILED_PRECONDITION"


class Unavailable(RuntimedError):
    code = "UNAVAILABLE"


class ResourceExhausted(RuntimedError):
    code = "RESOURCE_EXHAUSTED"


class Unimplemented(RuntimedError):
    code = "UNIMPLEMENTED"


class Aborted(RuntimedError):
    code = "ABORTED"


class DeadlineExceeded(RuntimedError):
    code = "DEADLINE_EXCEEDED"


class PermissionDenied(RuntimedError):
    code = "PERMISSION_DENIED"


class Canceled(RuntimedError):
    code = "CANCELLED"


BY_CODE: dict[str, type[RuntimedError]] = {
    cls.code: cls for cls in RuntimedError.__subclasses__()
}


def status_of(exc: BaseException) -> tuple[str, str] | None:
    """(status code name, message) for an error with a known meaning, else None (an
    internal error). The table for every server: the daemon's gRPC services and the shim's."""
    if isinstance(exc, RuntimedError):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return "RESOURCE_EXHAUSTED", f"no space left on device: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.errno in (23, 24):  # ENFILE, EMFILE
        return "RESOURCE_EXHAUSTED", f"too many open files: {exc}"
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "RESOURCE_EXHAUSTED", f"out of threads (pids limit?): {exc}"
    if getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return "RESOURCE_EXHAUSTED", f"no space left on device for metadata: {exc}"
    return None


def from_code(code_name: str, message: str) -> RuntimedError:
    """The typed error for a gRPC status code name (client side)."""
    return BY_CODE.get(code_name, RuntimedError)(message)
