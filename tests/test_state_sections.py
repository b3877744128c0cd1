"""State sections: one encoding for checkpoints and migration; damage is named, never guessed."""

import pytest

from vmmpy.state import Section, SectionError, SectionRegistry, decode_sections, encode_sections


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


def test_encoding_is_canonical():
    a = Section("x", 1, {"b": 1, "a": 2})
    b = Section("x", 1, {"a": 2, "b": 1})
    assert encode_sections([a]) == encode_sections([b])


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


def test_registry_refuses_unknown_and_newer_sections():
    registry = SectionRegistry({"vlapic": 2, "virtio-blk": 1})
    registry.check("vlapic", 2)
    registry.check("virtio-blk@pci.0.3.0", 1)
    with pytest.raises(SectionError, match=r"section 'vlapic' version 3 is newer than this vmmpy reads \(2\)"):
        registry.check("vlapic", 3, what="vm0.ckp.kern")
    with pytest.raises(SectionError, match="section 'gpu@pci.0.5.0' is unknown"):
        registry.check("gpu@pci.0.5.0", 1)


def test_payloads_must_be_plain_data():
    with pytest.raises(TypeError, match="JSON types or bytes"):
        encode_sections([Section("x", 1, {"obj": object()})])
