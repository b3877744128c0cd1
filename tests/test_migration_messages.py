"""The migration protocol's messages are declared once (``protocol.MESSAGES``): every message
type has exactly one declaration, its encoder and decoder are that declaration read two ways, and
a value one side refuses the other refuses with the same sentence."""

import dataclasses

import pytest

from vmmpy.migration import protocol as P
from vmmpy.migration.errors import ProtocolError

SAMPLES = {
    P.MessageType.HELLO: P.Hello((2, 3, 4, 5), b"n" * 32, "vmmpy"),
    P.MessageType.CHALLENGE: P.Challenge(5, True, b"c" * 32),
    P.MessageType.AUTH: b"m" * 32,
    P.MessageType.ACCEPT: P.Accept(P.Stage.SPEC, b"", "lz4"),
    P.MessageType.REFUSE: P.Refuse(P.Stage.AUTH, "no"),
    P.MessageType.SPEC: P.Spec(4096, "amd", 2, 1 << 30, 0, False, True, {"cpu0": 1}, "host", ("lz4",)),
    P.MessageType.MEMORY: P.Memory(1, P.MemoryFlags.FINAL),
    P.MessageType.MEMORY_END: P.MemoryEnd(1, 2, 3, 4, 5),
    P.MessageType.STATE: b"VMMPYSEC...",
    P.MessageType.COMMIT_REQUEST: (1 << 127) + 5,
    P.MessageType.COMMIT_ACK: 7,
    P.MessageType.COMMITTED: None,
    P.MessageType.ABORT: "gone",
    P.MessageType.RESUMED: 1234,
    P.MessageType.STREAMS: 4,
    P.MessageType.STREAMS_TOKEN: P.StreamsToken(4, b"t" * 32),
    P.MessageType.JOIN: P.Join(3, b"t" * 32, b""),
    P.MessageType.RESOLVE: P.Resolve(b"s" * 16, P.Decision.COMMIT),
    P.MessageType.RESOLVED: P.Resolved(P.Outcome.RUNNING, 9),
    P.MessageType.RELEASED: None,
    P.MessageType.LOCAL_MEMORY: P.LocalMemory((("lowmem", 0, 3 << 30), ("highmem", 4 << 30, 61 << 30)),
                                              (5).to_bytes(8, "little") + (2).to_bytes(8, "little")),
    P.MessageType.POSTCOPY: P.Postcopy(64 * 1024, (5).to_bytes(8, "little") + (2).to_bytes(8, "little")),
    P.MessageType.RECOVER: b"s" * 16,
    P.MessageType.RECOVERED: P.Outcome.UNKNOWN,
    P.MessageType.POSTCOPY_DONE: P.PostcopyDone(12, 60, 150, 900, 12_500, 300, 100),
    P.MessageType.ROUND_DONE: 3,
    P.MessageType.STATE_PART: b"VMMPYSEC..",
}


def test_every_message_type_is_declared_once_and_round_trips_within_its_bound():
    assert [m.type for m in P.MESSAGES] == list(P.MessageType)
    assert set(SAMPLES) == set(P.MessageType)
    for msg_type, value in SAMPLES.items():
        payload = P.encode_message(msg_type, value, max(P.PROTOCOL_VERSIONS))
        assert len(payload) <= P.MAX_PAYLOAD[msg_type], msg_type.name
        assert P.decode_message(msg_type, payload, max(P.PROTOCOL_VERSIONS)) == value, msg_type.name


def test_the_declared_bound_is_what_the_largest_message_takes():
    """MAX_PAYLOAD comes from the same table: the largest legal HELLO, ACCEPT, JOIN fill it exactly."""
    hello = P.Hello(tuple(range(16)), b"n" * 32, "x" * 255)
    assert len(P.encode_hello(hello)) == P.MAX_PAYLOAD[P.MessageType.HELLO]
    assert len(P.encode_accept(P.Accept(P.Stage.SPEC, b"p" * 32, "lz4"), 4)) == P.MAX_PAYLOAD[P.MessageType.ACCEPT]
    assert len(P.encode_join(P.Join(15, b"t" * 32, b"m" * 32))) == P.MAX_PAYLOAD[P.MessageType.JOIN]


@pytest.mark.parametrize("msg_type,bad,payload,sentence", [
    (P.MessageType.JOIN, P.Join(0, b"t" * 32), b"\x00\x00" + b"t" * 32 + b"\x00", "JOIN: stream index 0; data streams are 1 to 15"),
    (P.MessageType.STREAMS, 17, b"\x11\x00", "STREAMS: 17 streams; 2 to 16"),
    (P.MessageType.AUTH, b"m" * 5, b"\x05" + b"m" * 5, "AUTH: MAC length 5, expected 0 or 32"),
    (P.MessageType.HELLO, P.Hello((), b"n" * 32), b"\x00\x00" + b"n" * 32 + b"\x00", "HELLO: offers 0 protocol versions"),
    (P.MessageType.MEMORY, P.Memory(1, 4), b"\x01\x00\x00\x00\x04\x00\x00\x00", "MEMORY: unknown flags 0x4"),
    (P.MessageType.STREAMS_TOKEN, P.StreamsToken(2, b"t" * 31), None, "STREAMS_TOKEN: a session token is 32 bytes, got 31"),
])
def test_what_an_encoder_refuses_a_decoder_refuses_with_the_same_sentence(msg_type, bad, payload, sentence):
    with pytest.raises(ProtocolError, match=sentence):
        P.encode_message(msg_type, bad)
    if payload is not None:
        with pytest.raises(ProtocolError, match=sentence):
            P.decode_message(msg_type, payload)


def test_a_field_added_by_a_later_version_is_neither_sent_to_nor_read_from_an_older_peer():
    spec = SAMPLES[P.MessageType.SPEC]
    old = dataclasses.replace(spec, compression=())
    assert P.encode_spec(old, 3) + b"\x01\x01" == P.encode_spec(spec, 4)
    assert P.decode_spec(P.encode_spec(old, 3), 3) == old
    with pytest.raises(ProtocolError, match="SPEC: protocol version 3 cannot carry a compression offer"):
        P.encode_spec(spec, 3)
    with pytest.raises(ProtocolError, match=r"RESOLVE: unknown decision 3 \(1 commit, 2 abort\)"):
        P.decode_resolve(b"s" * 16 + b"\x03")


def test_the_docs_draw_the_receiver_s_transition_table():
    import pathlib
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "migration-protocol.md").read_text()
    block = doc.split("this drawing and the table the same):\n\n```\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == P.receiver_drawing()


def test_the_receiver_reads_only_what_its_state_and_version_allow():
    assert P.receiver_reads(P.RxState.READY, 2) == (P.MessageType.MEMORY, P.MessageType.STATE)
    assert P.receiver_reads(P.RxState.READY, 3) == (P.MessageType.STREAMS, P.MessageType.MEMORY, P.MessageType.STATE)
    assert P.receiver_reads(P.RxState.AWAIT_SPEC, 4) == (P.MessageType.SPEC,)
    assert P.receiver_reads(P.RxState.AWAIT_SPEC, 5) == (P.MessageType.SPEC, P.MessageType.RESOLVE)
    assert P.receiver_next(P.RxState.RECEIVING, P.MessageType.MEMORY_END) is P.RxState.READY
    with pytest.raises(ProtocolError, match="unexpected STATE in state have-state"):
        P.receiver_next(P.RxState.HAVE_STATE, P.MessageType.STATE)


def test_the_source_sends_only_in_its_sequence():
    order = [None, P.MessageType.HELLO, P.MessageType.AUTH, P.MessageType.SPEC, P.MessageType.MEMORY, P.MessageType.MEMORY_END,
             P.MessageType.MEMORY, P.MessageType.MEMORY_END, P.MessageType.STATE, P.MessageType.COMMIT_REQUEST,
             P.MessageType.COMMITTED, P.MessageType.RELEASED]
    for last, sent in zip(order, order[1:]):
        P.source_may_send(last, sent)
        P.source_may_send(last, P.MessageType.ABORT)
    with pytest.raises(ProtocolError, match="the source may not send STATE after SPEC"):
        P.source_may_send(P.MessageType.SPEC, P.MessageType.STATE)
    with pytest.raises(ProtocolError, match=r"may not send COMMITTED first \(the sequence allows HELLO\)"):
        P.source_may_send(None, P.MessageType.COMMITTED)


def test_local_memory_refuses_bad_segments_and_runs_by_name():
    good = P.LocalMemory((("lowmem", 0, 1 << 20),), b"")
    assert P.decode_local_memory(P.encode_local_memory(good)) == good
    with pytest.raises(ProtocolError, match="LOCAL_MEMORY: 3 segments; 1 to 2 may be handed over"):
        P.encode_local_memory(P.LocalMemory((("a", 0, 1),) * 3))
    with pytest.raises(ProtocolError, match="LOCAL_MEMORY: dirty runs are 16-byte pairs, got 8 bytes"):
        P.encode_local_memory(P.LocalMemory((("lowmem", 0, 1),), b"x" * 8))
    raw = bytearray(P.encode_local_memory(good))
    raw[0] = 0
    with pytest.raises(ProtocolError, match="LOCAL_MEMORY: 0 segments"):
        P.decode_local_memory(bytes(raw))
    with pytest.raises(ProtocolError, match="LOCAL_MEMORY: truncated in the dirty runs"):
        P.decode_local_memory(P.encode_local_memory(good)[:-4] + (1).to_bytes(4, "little"))


def test_postcopy_refuses_bad_chunk_sizes_and_runs_by_name():
    good = P.Postcopy(16 * 4096, (7).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    assert P.decode_postcopy(P.encode_postcopy(good)) == good
    for size in (0, 4095, 65 * 4096):
        with pytest.raises(ProtocolError, match=f"POSTCOPY: chunk size {size} is not 4 KiB to 256 KiB in whole pages"):
            P.encode_postcopy(P.Postcopy(size))
    with pytest.raises(ProtocolError, match="POSTCOPY: needed runs are 16-byte pairs, got 8 bytes"):
        P.encode_postcopy(P.Postcopy(4096, b"x" * 8))
    raw = bytearray(P.encode_postcopy(good))
    raw[0:4] = (12345).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="POSTCOPY: chunk size 12345"):
        P.decode_postcopy(bytes(raw))
    with pytest.raises(ProtocolError, match="POSTCOPY: truncated in the needed runs"):
        P.decode_postcopy(P.encode_postcopy(good)[:-4])
    with pytest.raises(ProtocolError, match="RECOVERED: unknown outcome 9"):
        P.decode_recovered(b"\x09")


def test_the_descriptors_follow_on_one_byte_and_a_wrong_count_is_refused():
    import os
    import socket

    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        P.send_memory_fds(a, [r, w])
        fds = P.recv_memory_fds(b, 2)
        assert len(fds) == 2
        for fd in fds:
            os.close(fd)
        P.send_memory_fds(a, [r])
        with pytest.raises(ProtocolError, match="announced 2 memory descriptor\\(s\\) on the byte b'F'; got b'F' with 1"):
            P.recv_memory_fds(b, 2)
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("state", "said"), [
    ("paused", "the guest stays here, paused (vmmctl --resume runs it)"),
    ("running", "the guest keeps running here"),
    (None, "the guest stays here, as it was before the migration"),
])
def test_a_migration_that_did_not_happen_says_where_the_guest_is_as_it_is(state, said):
    """vmmctl's and vmmrun's last words after a failed or cancelled migration follow the guest's
    real state; where vmmrun could not say it (None), nothing is claimed about it."""
    from vmmpy.runtime.control import guest_stays_here
    assert guest_stays_here(state) == said
