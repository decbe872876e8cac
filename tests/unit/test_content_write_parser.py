"""The Write RPC's request parser: the generated parser's result, without copying `data`."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.services.content import parse_write_request

REQUESTS = [
    pb.WriteContentRequest(),
    pb.WriteContentRequest(action=pb.STAT, ref="ref-1", total=123, expected="sha256:" + "a" * 64),
    pb.WriteContentRequest(action=pb.WRITE, ref="r", offset=1 << 20, data=os.urandom(1 << 20)),
    pb.WriteContentRequest(action=pb.WRITE, offset=5, data=b"x"),
    pb.WriteContentRequest(data=os.urandom(300)),
    pb.WriteContentRequest(
        action=pb.COMMIT, ref="layer-sha256:abc", total=4000, offset=3000, data=os.urandom(1000),
        expected="sha256:" + "b" * 64,
        labels={"containerd.io/gc.ref.content.l.0": "sha256:" + "c" * 64, "ünïcode": "välue"},
    ),
]


def split(message: pb.WriteContentRequest) -> tuple[pb.WriteContentRequest, bytes]:
    rest = pb.WriteContentRequest()
    rest.CopyFrom(message)
    rest.ClearField("data")
    return rest, message.data


@pytest.mark.parametrize("request_", REQUESTS)
def test_same_fields_as_the_generated_parser(request_):
    raw = request_.SerializeToString()
    message, data = parse_write_request(raw)
    expected_rest, expected_data = split(pb.WriteContentRequest.FromString(raw))
    assert message == expected_rest
    assert bytes(data) == expected_data
    assert not message.data  # the payload is only in `data`


def test_data_is_a_view_into_the_received_body():
    raw = REQUESTS[2].SerializeToString()
    _, data = parse_write_request(raw)
    assert isinstance(data, memoryview) and data.obj is raw
    assert data.nbytes == 1 << 20


def test_data_field_anywhere_in_the_body():
    # fields may come in any order on the wire; a data field first, labels last
    payload = os.urandom(5000)
    raw = (pb.WriteContentRequest(data=payload).SerializeToString()
           + pb.WriteContentRequest(ref="late", labels={"k": "v"}).SerializeToString())
    message, data = parse_write_request(raw)
    assert bytes(data) == payload
    assert message.ref == "late" and dict(message.labels) == {"k": "v"}


def test_repeated_data_field_last_wins_as_in_protobuf():
    raw = (pb.WriteContentRequest(ref="a", data=b"first").SerializeToString()
           + pb.WriteContentRequest(data=b"second").SerializeToString())
    message, data = parse_write_request(raw)
    assert bytes(data) == b"second" and message.ref == "a"


def test_unknown_fields_are_skipped_as_by_the_generated_parser():
    unknown = (bytes([(12 << 3) | 0, 0x87, 0x01])  # varint 135
               + bytes([(13 << 3) | 5, 1, 2, 3, 4])  # fixed32
               + bytes([(14 << 3) | 1]) + bytes(8)  # fixed64
               + bytes([0xA8, 0x01, 7]))  # field 21, a key of two bytes
    raw = unknown + REQUESTS[3].SerializeToString()
    message, data = parse_write_request(raw)
    assert bytes(data) == b"x" and message.offset == 5 and message.action == pb.WRITE


@pytest.mark.parametrize("raw", [
    REQUESTS[2].SerializeToString()[:-10],  # data cut short
    bytes([(6 << 3) | 2]),  # a data key without a length
    bytes([(2 << 3) | 2, 2, 0xFF, 0xFE]) + pb.WriteContentRequest(data=b"d").SerializeToString(),
    bytes([0x80] * 11),  # a varint that never ends
])
def test_broken_bodies_fail_as_with_the_generated_parser(raw):
    with pytest.raises(DecodeError):
        pb.WriteContentRequest.FromString(raw)
    with pytest.raises(DecodeError):
        parse_write_request(raw)


def test_import_request_data_is_a_view_options_parse_as_generated():
    from runtimed.api.images.v1 import archive_pb2
    from runtimed.services.archives import parse_import_request

    raw = archive_pb2.ImportRequest(data=os.urandom(70_000)).SerializeToString()
    message, data = parse_import_request(raw)
    assert isinstance(data, memoryview) and data.obj is raw
    assert bytes(data) == archive_pb2.ImportRequest.FromString(raw).data
    assert message.WhichOneof("request") is None

    options = archive_pb2.ImportRequest(options=archive_pb2.ImportOptions(base_name="x", unpack=True))
    message, data = parse_import_request(options.SerializeToString())
    assert message == options and not data
    # a data field and then options: the oneof's last member wins, as in protobuf
    both = archive_pb2.ImportRequest(data=b"d").SerializeToString() + options.SerializeToString()
    message, _ = parse_import_request(both)
    assert message.WhichOneof("request") == "options"
