"""Generate the Python modules for every .proto under proto/ into runtimed/api/.

The .proto files keep containerd's file paths (github.com/containerd/...), so clients in
other languages generate from proto/ as they would from containerd's tree. The Python
modules, though, must live inside our package: this script maps each proto path prefix to
a sub-package of `runtimed.api` and rewrites the generated imports to match, so we never
install a top-level `github` or `containerd` package.

    python proto/generate.py          regenerate runtimed/api/
    python proto/generate.py --check  exit 1 when runtimed/api/ is stale
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
API_DIR = ROOT / "runtimed" / "api"

# generated path prefix -> sub-package of runtimed.api (longest prefix wins); protoc turns
# the directory github.com/ into the packages github/com/.
PREFIXES = {
    "github/com/containerd/containerd/api/": "containerd/",
    "github/com/containerd/containerd/": "containerd/",
    "github/com/containerd/cgroups/": "cgroups/",
    "runtimed/": "",
}

API_INIT = '"""Generated protobuf and gRPC modules. Regenerate with `make proto`; do not edit."""\n'


def map_path(generated: str) -> str | None:
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if generated.startswith(prefix):
            return PREFIXES[prefix] + generated[len(prefix):]
    return None


def map_module(dotted: str) -> str | None:
    """`github.com.containerd.containerd.api.types` -> `runtimed.api.containerd.types`."""
    mapped = map_path(dotted.replace(".", "/") + "/")
    if mapped is None:
        return None
    return "runtimed.api" + ("." + mapped.rstrip("/").replace("/", ".") if mapped else "")


IMPORT_RE = re.compile(r"^(\s*)from ([\w.]+) import ", re.M)


def rewrite_imports(text: str) -> str:
    def repl(match: re.Match) -> str:
        mapped = map_module(match.group(2))
        return f"{match.group(1)}from {mapped} import " if mapped else match.group(0)

    return IMPORT_RE.sub(repl, text)


def googleapis_include() -> Path:
    """Directory holding google/rpc/status.proto (introspection's init_err).

    googleapis-common-protos ships the .proto next to its `google.rpc.status_pb2`, which
    generated code imports at run time, so we compile against exactly what we import and
    never generate a `google` package of our own.
    """
    spec = importlib.util.find_spec("google.rpc.status_pb2")
    if spec is None or spec.origin is None:
        raise SystemExit("google.rpc.status_pb2 missing: pip install googleapis-common-protos")
    root = Path(spec.origin).parents[2]
    if not (root / "google" / "rpc" / "status.proto").exists():
        raise SystemExit(f"google/rpc/status.proto not shipped under {root}")
    return root


def generate(out_dir: Path) -> None:
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"-I{googleapis_include()}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos,
        ]
        subprocess.run(cmd, check=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "__init__.py").write_text(API_INIT)
        for generated in sorted(Path(tmp).rglob("*.py*")):
            relative = generated.relative_to(tmp).as_posix()
            target = map_path(relative)
            if target is None:
                raise SystemExit(f"no package mapping for {relative}: add it to PREFIXES")
            dest = out_dir / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rewrite_imports(generated.read_text()))
        for package in [p for p in out_dir.rglob("*") if p.is_dir()]:
            init = package / "__init__.py"
            if not init.exists():
                init.write_text("")


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when runtimed/api is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            if not same_tree(Path(tmp), API_DIR):
                print("runtimed/api is stale: run `make proto`", file=sys.stderr)
                return 1
        print("runtimed/api is up to date")
        return 0
    with tempfile.TemporaryDirectory(dir=API_DIR.parent) as tmp:
        generate(Path(tmp) / "api")
        shutil.rmtree(API_DIR, ignore_errors=True)
        Path(tmp, "api").rename(API_DIR)
    print(f"generated {API_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
