"""`tarfile` with PEP 706's extraction filters (`extractall(..., filter="data")`) on every
Python 3.11: the standard library's from 3.11.4, the same code from `backports.tarfile`
before that. Debian 12's python3 is 3.11.2, and the Makefile builds on it."""

import sys

if sys.version_info >= (3, 11, 4):
    import tarfile
else:  # pragma: no cover - which branch runs depends on the interpreter
    from backports import tarfile

__all__ = ["tarfile"]
