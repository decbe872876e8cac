"""The per-container name files: hosts rendering, resolv.conf filtering, in-place writes."""

import os

from runtimed.network import files


def test_hosts_lists_self_then_peers_without_duplicates():
    text = files.render_hosts(
        [files.HostEntry("10.0.0.2", ["web", "web", "www"])],
        [files.HostEntry("10.0.0.3", ["db", "db-1"]), files.HostEntry("10.0.0.4", ["", ""])],
    )
    assert text.startswith("127.0.0.1\tlocalhost\n")
    assert text.endswith("10.0.0.2\tweb www\n10.0.0.3\tdb db-1\n")


def test_resolv_conf_drops_loopback_nameservers():
    host = (
        "# generated\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 192.0.2.53\n"
        "nameserver fe80::1%eth0\nsearch example.test\noptions edns0 trust-ad\nbogus line\n"
    )
    assert files.render_resolv_conf(host) == (
        "nameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch example.test\n"
        "options edns0 trust-ad\n"
    )
    assert files.render_resolv_conf("nameserver 127.0.0.1\n") == ""


def test_write_in_place_keeps_the_inode(tmp_path):
    path = tmp_path / "hosts"
    files.write_in_place(path, "a much longer first version\n")
    inode = os.stat(path).st_ino
    files.write_in_place(path, "short\n")
    assert path.read_text() == "short\n"
    assert os.stat(path).st_ino == inode


def test_publish_specs_parse_like_docker():
    import pytest

    from ctl.client.networks import Port, parse_publish
    from runtimed.errors import InvalidArgument

    assert parse_publish("8080:80") == Port(container_port=80, host_port=8080)
    assert parse_publish("127.0.0.1:8080:80/udp") == Port(80, 8080, "127.0.0.1", "udp")
    assert parse_publish("127.0.0.1::80") == Port(80, 0, "127.0.0.1")
    assert parse_publish("80") == Port(80)
    for bad in ("x:80", "80/sctp", "1:2:3:4"):
        with pytest.raises(InvalidArgument):
            parse_publish(bad)
