"""Platform parsing and matching as containerd's platforms package does it, and the
manifest/index parsing the importer and the registry client share."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed.errors import InvalidArgument
from runtimed.images import mediatypes, platforms
from runtimed.images.manifest import (
    MAX_JSON_SIZE,
    Descriptor,
    dump_json,
    gc_labels,
    parse_index,
    parse_manifest,
    walk,
)
from runtimed.images.platforms import Platform

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


@pytest.mark.parametrize("spec,want", [
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/x86_64", Platform("linux", "amd64")),
    ("linux/amd64/v1", Platform("linux", "amd64")),
    ("linux/amd64/v2", Platform("linux", "amd64", "v2")),
    ("linux/aarch64", Platform("linux", "arm64")),
    ("linux/arm64/v8", Platform("linux", "arm64")),
    ("linux/armhf", Platform("linux", "arm")),  # v7 is arm's default, dropped as containerd does
    ("linux/arm/7", Platform("linux", "arm", "v7")),
    ("linux/i386", Platform("linux", "386")),
    ("arm64", Platform("linux", "arm64")),
    ("Linux/AMD64", Platform("linux", "amd64")),
])
def test_parse(spec, want):
    assert platforms.parse(spec) == want


def test_parse_lone_os_takes_host_arch():
    assert platforms.parse("linux") == Platform("linux", platforms.host_default().architecture,
                                               platforms.parse("linux").variant)


@pytest.mark.parametrize("spec", ["", "linux/", "linux/*", "a/b/c/d", "linux/amd 64", "nosuchthing"])
def test_parse_refuses(spec):
    with pytest.raises(InvalidArgument):
        platforms.parse(spec)


def test_amd64_variants_run_older_levels_best_first():
    m = platforms.only(platforms.parse("linux/amd64/v3"))
    for variant in ("v3", "v2", "", "v1"):
        assert m.match(Platform("linux", "amd64", variant))
    assert m.match(Platform("linux", "386"))
    assert not m.match(Platform("linux", "amd64", "v4"))
    assert not m.match(Platform("linux", "arm64"))
    order = platforms.sort_best_first(m, [Platform("linux", "386"), Platform("linux", "amd64"),
                                          Platform("linux", "amd64", "v3"),
                                          Platform("linux", "amd64", "v2")])
    assert [platforms.format(p) for p in order] == [
        "linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]


def test_strict_and_arm64():
    strict = platforms.only_strict(platforms.parse("linux/amd64/v2"))
    assert not strict.match(Platform("linux", "amd64"))
    arm64 = platforms.only(platforms.parse("linux/arm64"))
    assert arm64.match(Platform("linux", "arm", "v7"))
    assert arm64.match(Platform("linux", "aarch64", "v8"))
    assert not arm64.match(Platform("linux", "amd64"))


def test_host_default_matches_itself():
    host = platforms.host_default()
    assert host.os == "linux" and host.architecture
    assert platforms.default().match(host)


@given(st.sampled_from(["amd64", "x86_64", "arm64", "aarch64", "arm", "armhf", "386", "s390x"]),
       st.sampled_from(["", "v1", "v2", "v7", "v8"]))
def test_normalize_is_idempotent(arch, variant):
    once = platforms.normalize(Platform("linux", arch, variant))
    assert platforms.normalize(once) == once
    assert platforms.only(once).match(once)


def test_platform_json_round_trip():
    p = Platform("windows", "amd64", "", "10.0.17763", ("win32k",))
    assert p.to_json() == {"architecture": "amd64", "os": "windows",
                           "os.version": "10.0.17763", "os.features": ["win32k"]}
    assert Platform.from_json(p.to_json()) == p


# -- manifests ----------------------------------------------------------------------------


def manifest(layers=(D2,), config=D1, **extra) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config, "size": 2},
        "layers": [{"mediaType": mediatypes.OCI_LAYER_GZIP, "digest": d, "size": 3} for d in layers],
        **extra,
    }).encode()


def test_parse_manifest_and_gc_labels():
    m = parse_manifest(manifest(layers=(D2, D3)))
    assert m.config.digest == D1 and [layer.digest for layer in m.layers] == [D2, D3]
    assert gc_labels([m.config, *m.layers]) == {
        "containerd.io/gc.ref.content.config": D1,
        "containerd.io/gc.ref.content.l.0": D2,
        "containerd.io/gc.ref.content.l.1": D3,
    }


@pytest.mark.parametrize("data,message", [
    (b"{", "invalid JSON"),
    (b"[]", "expected a JSON object"),
    (manifest(config="sha256:short"), "config: digest"),
    (json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "found an index"),
    (json.dumps({"schemaVersion": 1, "fsLayers": [{}]}).encode(), "schema 1"),
    (manifest().replace(b'"size": 3', b'"size": -3'), "size must be a non-negative"),
    (manifest().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'), "schemaVersion must be 2"),
    (b'{"x":"' + b"a" * MAX_JSON_SIZE + b'"}', "exceeds"),
])
def test_parse_manifest_refuses(data, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_manifest(data)


def test_walk_filters_index_children_by_platform():
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": mediatypes.OCI_MANIFEST, "digest": D1, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": mediatypes.OCI_MANIFEST, "digest": D2, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"}},
    ]}).encode()
    docs = {
        D3: index,
        D1: manifest(layers=("sha256:" + "a" * 64,), config="sha256:" + "c" * 64),
        D2: manifest(layers=("sha256:" + "b" * 64,), config="sha256:" + "d" * 64),
        "sha256:" + "c" * 64: b"{}",
        "sha256:" + "d" * 64: b"{}",
    }
    root = Descriptor(mediatypes.OCI_INDEX, D3, len(index))
    seen = [n.descriptor.digest for n in walk(lambda d: docs[d.digest], root,
                                              platforms.only_strict(Platform("linux", "amd64")))]
    assert seen == [D3, D1, "sha256:" + "c" * 64, "sha256:" + "a" * 64]
    everything = [n.descriptor.digest for n in walk(lambda d: docs[d.digest], root, platforms.ALL)]
    assert "sha256:" + "b" * 64 in everything
    assert parse_index(index).manifests[1].platform == Platform("linux", "arm64")


def test_dump_json_matches_go():
    assert dump_json({"a": "<&>", "b": [1, "é"]}) == '{"a":"\\u003c\\u0026\\u003e","b":[1,"é"]}'.encode()
    desc = Descriptor(mediatypes.OCI_MANIFEST, D1, 5, {"z": "1", "a": "2"}, Platform("linux", "arm64", "v8"))
    assert list(desc.to_json()) == ["mediaType", "digest", "size", "annotations", "platform"]
    assert list(desc.to_json()["annotations"]) == ["a", "z"]
