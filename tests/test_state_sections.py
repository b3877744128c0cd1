"""State sections: one encoding for checkpoints and migration; damage is named, never guessed."""

import pytest

from vmmpy.state import (
    Section,
    SectionError,
    SectionRegistry,
    decode_payload,
    decode_sections,
    encode_container,
    encode_payload,
    encode_sections,
    read_container,
)


def sample():
    return [
        Section("vm", 1, {"ncpus": 2, "tsc": 2**63 + 5, "name": "vm0"}),
        Section("uart@lpc.com1", 1, {"rx_fifo": [1, 2, 3], "nvram": b"\x00\xffraw", "nested": {"a": [b"x"]}}),
    ]


def test_sections_round_trip_exactly():
    back = decode_sections(encode_sections(sample()))
    assert back == sample()
    assert isinstance(back[1].payload["nvram"], bytes)
    assert back[0].payload["tsc"] == 2**63 + 5


def test_the_writer_s_records_are_the_reader_s():
    """A writer learns where each section lies from the encoder, never by parsing what it made:
    the records are those the reader finds (offset and size span name length to payload end)."""
    data, records = encode_container(sample())
    assert data == encode_sections(sample())
    assert records == [record for record, _ in read_container(data)]
    assert [(r.name, r.offset) for r in records] == [("vm", 16), ("uart@lpc.com1", 16 + records[0].size)]
    assert records[-1].offset + records[-1].size == len(data)


def test_encoding_is_canonical():
    a = Section("x", 1, {"b": 1, "a": 2})
    b = Section("x", 1, {"a": 2, "b": 1})
    assert encode_sections([a]) == encode_sections([b])


def test_the_payload_encoding_is_pinned_byte_for_byte():
    """Checkpoints hold these bytes and their checksums: the encoding may get faster, never change."""
    payload = {"b": bytearray(b"\x00\xff"), "a": [1, {"z": None, "y": True}, (2, -3)], "c": "\u00e9\n", "d": {"$x": memoryview(b"ab")}, "e": memoryview(b"abcdef")[::2]}
    data = encode_payload(payload)
    assert data == b'{"a":[1,{"y":true,"z":null},[2,-3]],"b":{"$bytes":"AP8="},"c":"\\u00e9\\n","d":{"$x":{"$bytes":"YWI="}},"e":{"$bytes":"YWNl"}}'
    assert decode_payload("x", data) == {"a": [1, {"y": True, "z": None}, [2, -3]], "b": b"\x00\xff", "c": "\u00e9\n", "d": {"$x": b"ab"}, "e": b"ace"}


def test_every_flipped_byte_is_refused_with_a_name():
    data = encode_sections(sample())
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        with pytest.raises(SectionError, match=r"^vm0\.ckp\.kern: "):
            decode_sections(bytes(damaged), what="vm0.ckp.kern")


def test_truncation_is_refused_at_every_length():
    data = encode_sections(sample())
    for length in range(len(data)):
        with pytest.raises(SectionError):
            decode_sections(data[:length])


def test_registry_refuses_unknown_newer_and_too_old_sections():
    registry = SectionRegistry({"virtio-blk": 1})
    registry.register("vlapic", 3, oldest=2)
    registry.check("vlapic", 2)
    registry.check("vlapic", 3)
    registry.check("virtio-blk@pci.0.3.0", 1)
    with pytest.raises(SectionError, match=r"vm0.ckp.kern: section 'vlapic' version 4 is newer than this vmmpy reads \(versions 2 to 3\)"):
        registry.check("vlapic", 4, what="vm0.ckp.kern")
    with pytest.raises(SectionError, match=r"section 'vlapic' version 1 is older than this vmmpy still reads \(versions 2 to 3\)"):
        registry.check("vlapic", 1)
    with pytest.raises(SectionError, match="section 'gpu@pci.0.5.0' is unknown"):
        registry.check("gpu@pci.0.5.0", 1)


def test_payloads_must_be_plain_data():
    with pytest.raises(TypeError, match="section 'x': state values must be JSON types or bytes, got object"):
        encode_sections([Section("x", 1, {"obj": object()})])


def test_a_declared_state_with_a_key_that_is_not_a_string_is_refused():
    """JSON would write the key 1 as "1" and read back another mapping: ``persist.dump`` refuses it."""
    import dataclasses
    from typing import ClassVar

    from vmmpy.state import persist

    @dataclasses.dataclass
    class Pending:
        VERSION: ClassVar[int] = 1
        read: dict | None

    assert persist.dump(Pending({"port": 0x3F8})) == {"read": {"port": 0x3F8}}
    with pytest.raises(TypeError, match="state keys must be strings, got 1"):
        persist.dump(Pending({1: 2}))


def raw_container(name: bytes, payload: bytes, version: int = 1) -> bytes:
    """A one-section container as a forger writes it, with a correct checksum."""
    import struct

    from vmmpy import _core

    checksum = _core.xxh3_64(name + struct.pack("<IQ", version, len(payload)) + payload)
    return (struct.pack("<8sII", b"VMMPYSEC", 1, 1) + struct.pack("<H", len(name)) + name
            + struct.pack("<IQQ", version, len(payload), checksum) + payload)


@pytest.mark.parametrize(
    "name, payload, version, message",
    [
        (b"x", b"[" * 100_000 + b"]" * 100_000, 1, r"section 'x': payload is not valid state encoding \(arrays and objects nest more than the 64 levels allowed\)"),
        (b"x", b'{"a": NaN}', 1, r"section 'x': payload is not valid state encoding \(NaN is not a JSON number\)"),
        (b"x", b'{"a": 1, "a": 2}', 1, r"key 'a' appears twice in one object"),
        (b"x", b'{"b": {"$bytes": 7}}', 1, r"a \$bytes value must be a base64 string, not int"),
        (b"x", b'{"b": {"$bytes": "!!"}}', 1, r"a \$bytes value is not base64"),
        (b"x", b'"text"', 1, r"section 'x': payload is a str, not a mapping"),
        (b"x", b"{}", 0, r"section 'x' has invalid version 0"),
        (b"", b"{}", 1, r"section 0 of 1 has a name of 0 bytes \(1 to 255 allowed\)"),
        (b"n" * 256, b"{}", 1, r"section 0 of 1 has a name of 256 bytes"),
        (b"\xff\xfe", b"{}", 1, r"section 0 of 1 has a name that is not UTF-8"),
        (b"a\nb", b"{}", 1, r"section 0 of 1 has a name with unprintable characters \('a\\nb'\)"),
    ],
    ids=["100k-nested", "nan", "repeated-key", "bytes-not-a-string", "bytes-not-base64", "not-an-object",
         "version-zero", "empty-name", "long-name", "name-not-utf8", "name-unprintable"],
)
def test_a_forged_record_with_a_correct_checksum_is_refused_by_name(name, payload, version, message):
    with pytest.raises(SectionError, match=r"^vm0\.ckp\.kern: (section 'x': payload is not valid state encoding \()?" + message):
        decode_sections(raw_container(name, payload, version), what="vm0.ckp.kern")


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "section, message",
    [
        (Section("", 1, {}), r"section '': a name of 0 bytes"),
        (Section("x", 0, {}), r"section 'x': version 0 is not 1 to 4294967295"),
        (Section("x", 1, {"deep": nested(64)}), r"section 'x': payload arrays and objects nest more than the 64 levels allowed"),
        (Section("x", 1, {"f": float("nan")}), r"section 'x': Out of range float values are not JSON compliant"),
    ],
    ids=["empty-name", "version-zero", "too-deep", "nan"],
)
def test_the_encoder_refuses_what_a_reader_would_refuse(section, message):
    with pytest.raises(ValueError, match=message):
        encode_sections([section])
    with pytest.raises(ValueError, match="appears twice"):
        encode_sections([Section("x", 1, {}), Section("x", 1, {})])
