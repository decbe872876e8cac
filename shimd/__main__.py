"""`shimd --id ID --namespace NS --bundle DIR`: start a detached shim for one container
and print its gRPC address (see shimd/server.py). Kept import-light: the fork happens
before gRPC is loaded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shimd", description="per-container shim")
    parser.add_argument("--id", required=True, help="container id")
    parser.add_argument("--namespace", default="default", help="containerd namespace")
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    args = parser.parse_args(argv)

    from shimd.server import launch

    return launch(args.id, args.namespace, args.bundle)


if __name__ == "__main__":
    sys.exit(main())
