"""Small OCI test images, built offline from Debian's busybox-static.

    python3 tests/testimages.py OUT_DIR [--large]

writes into OUT_DIR:

- busybox.tar         docker.io/library/busybox:latest, OCI layout, one gzip layer
- busybox-docker.tar  the same image in `docker save` layout (manifest.json, repositories)
- multilayer.tar      docker.io/runtimed/multilayer:latest: whiteouts, an opaque dir, a hard
                      link, a symlink, a setuid file, a fifo, a VOLUME
- multiplatform.tar   docker.io/runtimed/multiplatform:latest: an index of linux/amd64
                      (busybox) and linux/arm64 (a trivial layer)
- large.tar           (--large) docker.io/runtimed/large:latest: ~200 MB over four layers
- images.json         what each archive holds (names, digests), for tests

Everything is deterministic (fixed mtimes, sorted entries, gzip mtime 0), so the same
busybox binary gives the same digests. Archives are built once into a cache keyed by the
inputs (this file, the busybox binary, the host architecture, the zlib version) and
hard-linked into OUT_DIR, so repeated test runs are fast. Importable: `build(out_dir)`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

BUSYBOX_NAME = "docker.io/library/busybox:latest"
MULTILAYER_NAME = "docker.io/runtimed/multilayer:latest"
MULTIPLATFORM_NAME = "docker.io/runtimed/multiplatform:latest"
LARGE_NAME = "docker.io/runtimed/large:latest"

APPLETS = """
    [ ash awk base64 basename cat chgrp chmod chown cmp cp cut date dd df diff dirname du
    echo env expr false find free grep groups gunzip gzip head hostname id ip kill killall
    ln ls md5sum mkdir mkfifo mknod mktemp more mount mv nc nproc od pidof ping printf ps
    pwd readlink realpath rm rmdir sed seq sh sha256sum sleep sort stat sync tail tar tee
    test timeout top touch tr true truncate umount uname uniq unshare uptime usleep vi wc
    wget which whoami xargs yes zcat
""".split()


@dataclass
class TestImage:
    """What one archive holds, as tests check it after import."""

    archive: str
    name: str
    target: dict  # the descriptor index.json names (the image record's target)
    manifests: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.archive)


# -- deterministic layer tars ------------------------------------------------------------


class Layer:
    """A layer tar built from entries sorted by name (hard links after their targets)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
        info.uname = info.gname = ""
        return info

    def dir(self, name: str, mode: int = 0o755) -> Layer:
        self._entries[name.strip("/") + "/"] = (self._info(name.strip("/") + "/", tarfile.DIRTYPE, mode), None)
        return self

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Layer:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self._entries[info.name] = (info, data)
        return self

    def symlink(self, name: str, target: str) -> Layer:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._entries[info.name] = (info, None)
        return self

    def hardlink(self, name: str, target: str) -> Layer:
        info = self._info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target.lstrip("/")
        self._entries[info.name] = (info, None)
        return self

    def fifo(self, name: str, mode: int = 0o644) -> Layer:
        self._entries[name.lstrip("/")] = (self._info(name, tarfile.FIFOTYPE, mode), None)
        return self

    def whiteout(self, name: str) -> Layer:
        parent, _, base = name.strip("/").rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> Layer:
        return self.file(directory.strip("/") + "/.wh..wh..opq", b"")

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            order = sorted(self._entries, key=lambda n: (self._entries[n][0].type == tarfile.LNKTYPE, n))
            for name in order:
                info, data = self._entries[name]
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """gzip with mtime 0 and no file name: the same bytes in give the same bytes out."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


# -- OCI layout writer -------------------------------------------------------------------


class Layout:
    """Blobs of one OCI image layout, written out as a tar by `write`."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes | Path] = {}

    def add(self, media_type: str, data: bytes, **extra) -> dict:
        digest = sha256(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def add_file(self, media_type: str, path: Path, digest: str) -> dict:
        self.blobs[digest] = path
        return {"mediaType": media_type, "digest": digest, "size": path.stat().st_size}

    def image(self, layers: list[tuple[bytes | tuple[Path, str], str]], config: dict, arch: str,
              variant: str = "") -> tuple[dict, dict]:
        """Add layers (gzip bytes or (file, digest), with their diff IDs) and a config;
        return the manifest descriptor and the config dict."""
        layer_descs = []
        for blob, _ in layers:
            if isinstance(blob, tuple):
                layer_descs.append(self.add_file(OCI_LAYER_GZIP, *blob))
            else:
                layer_descs.append(self.add(OCI_LAYER_GZIP, blob))
        config = {
            "architecture": arch,
            "os": "linux",
            **({"variant": variant} if variant else {}),
            "created": CREATED,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
            "history": [{"created": CREATED, "created_by": f"tests/testimages.py layer {i}"}
                        for i in range(len(layers))],
        }
        config_desc = self.add(OCI_CONFIG, dump(config))
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                    "layers": layer_descs}
        return self.add(OCI_MANIFEST, dump(manifest)), config

    def write(self, path: Path, index_entries: list[dict]) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add_bytes(tf, "index.json", dump(index))
            _add_dir(tf, "blobs/")
            _add_dir(tf, "blobs/sha256/")
            for digest in sorted(self.blobs):
                name = "blobs/sha256/" + digest.removeprefix("sha256:")
                blob = self.blobs[digest]
                if isinstance(blob, Path):
                    info = _info(name, blob.stat().st_size)
                    with blob.open("rb") as f:
                        tf.addfile(info, f)
                else:
                    _add_bytes(tf, name, blob)


def _info(name: str, size: int, mode: int = 0o444) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, mode, MTIME, "", ""
    return info


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    tf.addfile(_info(name, len(data)), io.BytesIO(data))


def _add_dir(tf: tarfile.TarFile, name: str) -> None:
    info = _info(name, 0, 0o755)
    info.type = tarfile.DIRTYPE
    tf.addfile(info)


def named(desc: dict, name: str) -> dict:
    """An index.json entry naming the image as containerd's exporter does."""
    tag = name.rpartition(":")[2]
    return {**desc, "annotations": {"io.containerd.image.name": name,
                                    "org.opencontainers.image.ref.name": tag}}


# -- the images -------------------------------------------------------------------------


def busybox_layer() -> Layer:
    available = set(subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                                   check=True).stdout.split())
    layer = Layer()
    for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "var", "var/run"):
        layer.dir(d)
    layer.dir("root", 0o700)
    layer.dir("tmp", 0o1777)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        if applet in available:
            layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                             b"nobody:x:65534:65534:nobody:/home:/bin/false\n")
    layer.file("etc/group", b"root:x:0:\nnobody:x:65534:\n")
    layer.file("etc/hostname", b"busybox\n")
    return layer


def build_busybox(layout: Layout, arch: str) -> tuple[dict, dict, bytes]:
    tar = busybox_layer().tar()
    manifest, config = layout.image([(gzip_bytes(tar), sha256(tar))],
                                    {"Env": [PATH_ENV], "Cmd": ["sh"]}, arch)
    return manifest, config, tar


def build_multilayer(layout: Layout, busybox_tar: bytes, arch: str) -> dict:
    data = (Layer()
            .dir("data").dir("data/dir").dir("opaque").dir("gone")
            .file("data/keep.txt", b"keep\n")
            .file("data/remove-me.txt", b"to be removed\n")
            .file("data/dir/a", b"a\n")
            .file("opaque/old1", b"old1\n")
            .file("opaque/old2", b"old2\n")
            .file("gone/file", b"the whole dir goes\n")
            .file("data/setuid", b"#!/bin/sh\necho setuid\n", 0o4755)
            .file("data/owned", b"owned by nobody\n", 0o640, uid=65534, gid=65534)
            .fifo("data/fifo")
            .symlink("data/link", "keep.txt")
            .hardlink("data/hard", "data/keep.txt")).tar()
    changes = (Layer()
               .dir("data").dir("opaque")
               .whiteout("data/remove-me.txt")
               .whiteout("gone")
               .opaque("opaque")
               .file("opaque/new", b"new\n")
               .file("data/keep.txt", b"kept, and changed in layer 3\n")).tar()
    layers = [(gzip_bytes(t), sha256(t)) for t in (busybox_tar, data, changes)]
    config = {"Env": [PATH_ENV], "Cmd": ["sh"], "Volumes": {"/data": {}},
              "WorkingDir": "/data", "Labels": {"org.example.test": "multilayer"}}
    manifest, _ = layout.image(layers, config, arch)
    return manifest


def build_multiplatform(layout: Layout, busybox_tar: bytes) -> dict:
    trivial = Layer().dir("etc").file("etc/arch", b"arm64\n").tar()
    amd64, _ = layout.image([(gzip_bytes(busybox_tar), sha256(busybox_tar))],
                            {"Env": [PATH_ENV], "Cmd": ["sh"]}, "amd64")
    arm64, _ = layout.image([(gzip_bytes(trivial), sha256(trivial))],
                            {"Env": [PATH_ENV], "Cmd": ["sh"]}, "arm64", "v8")
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**amd64, "platform": {"architecture": "amd64", "os": "linux"}},
            {**arm64, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ],
    }
    return layout.add(OCI_INDEX, dump(index))


def build_large(layout: Layout, workdir: Path, arch: str, layers: int = 4,
                layer_size: int = 55 << 20) -> dict:
    """Layers of seeded pseudo-random data (7/8) and text (1/8): large, and barely
    compressible, so import measures moving bytes rather than compressing them."""
    built = []
    for n in range(layers):
        rng = random.Random(f"runtimed-large-{n}")
        tar_path, gz_path = workdir / f"large{n}.tar", workdir / f"large{n}.tar.gz"
        tar_hash, gz_hash = hashlib.sha256(), hashlib.sha256()
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        with gz_path.open("wb") as gz:

            def emit(chunk: bytes, tar_hash=tar_hash, gz_hash=gz_hash, compressor=compressor,
                     gz=gz) -> None:
                tar_hash.update(chunk)
                out = compressor.compress(chunk)
                gz_hash.update(out)
                gz.write(out)

            files, per_file = 5, layer_size // 5
            for f in range(files):
                info = _info(f"large/{n}/file{f}.bin", per_file, 0o644)
                emit(info.tobuf(tarfile.PAX_FORMAT))
                left = per_file
                while left:
                    size = min(left, 1 << 20)
                    chunk = rng.randbytes(size * 7 // 8) + b"runtimed large test image\n" * (
                        (size - size * 7 // 8) // 26 + 1)
                    emit(chunk[:size])
                    left -= size
                pad = -per_file % tarfile.BLOCKSIZE
                emit(b"\0" * pad)
            emit(b"\0" * (tarfile.BLOCKSIZE * 2))
            tail = compressor.flush()
            gz_hash.update(tail)
            gz.write(tail)
        tar_path.unlink(missing_ok=True)
        built.append(((gz_path, "sha256:" + gz_hash.hexdigest()), "sha256:" + tar_hash.hexdigest()))
    manifest, _ = layout.image(built, {"Env": [PATH_ENV], "Cmd": ["sh"]}, arch)
    return manifest


def build_docker_archive(path: Path, config: dict, layer_tar: bytes, repo_tag: str) -> None:
    """The `docker save` (v1.2) layout: <layer id>/layer.tar, <config hex>.json, manifest.json."""
    config_bytes = dump(config)
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    layer_id = hashlib.sha256(layer_tar).hexdigest()
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [repo_tag],
                 "Layers": [f"{layer_id}/layer.tar"]}]
    repo, _, tag = repo_tag.rpartition(":")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add_dir(tf, f"{layer_id}/")
        _add_bytes(tf, f"{layer_id}/VERSION", b"1.0")
        _add_bytes(tf, f"{layer_id}/json", dump({"id": layer_id, "created": CREATED}))
        _add_bytes(tf, f"{layer_id}/layer.tar", layer_tar)
        _add_bytes(tf, f"{config_hex}.json", config_bytes)
        _add_bytes(tf, "manifest.json", dump(manifest))
        _add_bytes(tf, "repositories", dump({repo: {tag: layer_id}}))


def _describe(archive: Path, name: str, target: dict, layout: Layout | None) -> TestImage:
    image = TestImage(str(archive), name, target)
    if layout is None:
        return image
    stack = [target]
    while stack:
        desc = stack.pop()
        image.blobs.append(desc["digest"])
        if desc["mediaType"] in (OCI_INDEX, OCI_MANIFEST):
            doc = json.loads(layout.blobs[desc["digest"]])
            if desc["mediaType"] == OCI_INDEX:
                stack.extend(reversed(doc["manifests"]))
            else:
                image.manifests.append(desc["digest"])
                image.configs.append(doc["config"]["digest"])
                image.layers.extend(layer["digest"] for layer in doc["layers"])
                config = json.loads(layout.blobs[doc["config"]["digest"]])
                image.diff_ids.extend(config["rootfs"]["diff_ids"])
                stack.extend(reversed([doc["config"], *doc["layers"]]))
    image.blobs = sorted(set(image.blobs))
    return image


def _build_into(out: Path, large: bool) -> dict[str, TestImage]:
    arch = host_arch()
    images: dict[str, TestImage] = {}

    layout = Layout()
    manifest, config, busybox_tar = build_busybox(layout, arch)
    layout.write(out / "busybox.tar", [named(manifest, BUSYBOX_NAME)])
    images["busybox"] = _describe(out / "busybox.tar", BUSYBOX_NAME, manifest, layout)

    build_docker_archive(out / "busybox-docker.tar", config, busybox_tar, "busybox:latest")
    docker = _describe(out / "busybox-docker.tar", BUSYBOX_NAME, {}, None)
    docker.configs = [sha256(dump(config))]
    docker.layers = docker.diff_ids = [sha256(busybox_tar)]
    images["busybox-docker"] = docker

    layout = Layout()
    manifest = build_multilayer(layout, busybox_tar, arch)
    layout.write(out / "multilayer.tar", [named(manifest, MULTILAYER_NAME)])
    images["multilayer"] = _describe(out / "multilayer.tar", MULTILAYER_NAME, manifest, layout)

    layout = Layout()
    index = build_multiplatform(layout, busybox_tar)
    layout.write(out / "multiplatform.tar", [named(index, MULTIPLATFORM_NAME)])
    images["multiplatform"] = _describe(out / "multiplatform.tar", MULTIPLATFORM_NAME, index, layout)

    if large:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            layout = Layout()
            manifest = build_large(layout, Path(tmp), arch)
            layout.write(out / "large.tar", [named(manifest, LARGE_NAME)])
            images["large"] = _describe(out / "large.tar", LARGE_NAME, manifest, layout)
    return images


# -- cache ---------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("RUNTIMED_TESTIMAGES_CACHE")
                or Path.home() / ".cache" / "runtimed" / "testimages")


def cache_key() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    with BUSYBOX.open("rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    h.update(f"{host_arch()} {zlib.ZLIB_RUNTIME_VERSION} {sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def _cached(large: bool) -> Path:
    """The cache directory holding the archives, built under a lock when missing."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / (cache_key() + ("-large" if large else ""))
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "images.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
            try:
                images = _build_into(tmp, large)
                for image in images.values():
                    image.archive = Path(image.archive).name
                (tmp / "images.json").write_text(
                    json.dumps({k: asdict(v) for k, v in images.items()}, indent=2) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for stale in root.iterdir():  # builds of older inputs are never used again
                if stale.is_dir() and not stale.name.startswith((cache_key(), ".")):
                    shutil.rmtree(stale, ignore_errors=True)
    return final


def build(out_dir: str | os.PathLike, large: bool = False) -> dict[str, TestImage]:
    """Put the test archives and images.json into `out_dir`; return what each holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cached = _cached(large)
    described = json.loads((cached / "images.json").read_text())
    images = {}
    for key, fields in described.items():
        src, dest = cached / fields["archive"], out / fields["archive"]
        if not dest.exists() or not os.path.samefile(src, dest):
            dest.unlink(missing_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        images[key] = TestImage(**{**fields, "archive": str(dest)})
    (out / "images.json").write_text(json.dumps({k: asdict(v) for k, v in images.items()},
                                                indent=2) + "\n")
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the OCI test image archives")
    parser.add_argument("out_dir")
    parser.add_argument("--large", action="store_true", help="also build large.tar (~200 MB)")
    args = parser.parse_args(argv)
    for image in build(args.out_dir, args.large).values():
        print(f"{image.archive}\t{image.name}\t{image.target.get('digest', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
