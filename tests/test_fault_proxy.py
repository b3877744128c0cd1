"""The fault proxy (tests/fault_proxy.py) and its case helpers (tests/fault_cases.py).

First on scripted streams of real frames and real page batches (the encoders' own bytes), where
the exact bytes each end received are known: every action lands at exactly the point asked for.
Then on live migrations between real vmmrun processes: a dry run logs the whole protocol with
the right lengths and changes nothing; a cut, a reset and a kill -9 at a named phase land where
asked and the source's guest runs on."""

import json
import os
import re
import socket
import threading
import time

import pytest

from vmmpy import _core
from vmmpy.memory import GuestMemory
from vmmpy.migration import protocol as P

from .fault_cases import fault_points, kill_at_phase, phase_point
from .fault_proxy import MAX_CONNECTIONS, FaultProxy, Message
from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_listener, wait_for_socket, wait_for_state
from .test_migration_processes import abtest_args, expected_console, live_migrate_in_process

MiB = 1 << 20
T = P.MessageType


# ---- scripted streams ---------------------------------------------------------------------------
def _batches(memory: GuestMemory, compress: str) -> bytes:
    """What send_all_pages writes: real page batches, read back from a socketpair."""
    a, b = socket.socketpair()
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: b.recv(1 << 20), b"")], daemon=True)
    reader.start()
    memory.send_all_pages(a, compress=compress)
    a.close()
    reader.join(30)
    b.close()
    return bytes(out)


def _frame_of_unknown_type(raw_type: int, payload: bytes) -> bytes:
    """A frame of a type this vmmpy does not define, as a later protocol could send."""
    head = P.HEADER.pack(P.MAGIC, P.FRAME_VERSION, raw_type, 0, len(payload), 0)[:16]
    return head + _core.xxh3_64(head + payload).to_bytes(8, "little") + payload


@pytest.fixture(scope="module")
def script():
    """Both directions of a scripted session as (kind, bytes) lists, each message whole."""
    memory = GuestMemory("8M")
    memory.write(0x10000, os.urandom(3 * 4096))  # incompressible: stays a plain batch
    memory.write(0x200000, b"\x01" * (300 * 4096))  # compresses to almost nothing
    plain = _batches(memory, "off")
    lz4 = _batches(memory, "lz4")
    assert plain[:4] == b"VMPB" and lz4[:4] == b"VMPB"
    s2d = [
        ("HELLO", P.encode_frame(T.HELLO, b"h" * 40)),
        ("MEMORY", P.encode_frame(T.MEMORY, P.encode_memory(P.Memory(0, P.MemoryFlags.ALL_PAGES)))),
        ("BATCH", plain),  # one batch: 8 MiB has one segment and fewer than 4096 data pages
        ("EMPTY_BATCH", P.end_of_round_batch(0)),
        ("MEMORY", P.encode_frame(T.MEMORY, P.encode_memory(P.Memory(1, P.MemoryFlags.FINAL)))),
        *_split_lz4(lz4),
        ("EMPTY_BATCH", P.end_of_round_batch(0)),
        ("TYPE_99", _frame_of_unknown_type(99, b"later")),
        ("STATE", P.encode_frame(T.STATE, os.urandom(20_000))),
        ("COMMITTED", P.encode_frame(T.COMMITTED)),
    ]
    d2s = [
        ("CHALLENGE", P.encode_frame(T.CHALLENGE, b"c" * 35)),
        ("ACCEPT", P.encode_frame(T.ACCEPT, bytes([1, 0]))),
        ("COMMIT_ACK", P.encode_frame(T.COMMIT_ACK, bytes(16))),
        ("RESUMED", P.encode_frame(T.RESUMED, P.encode_resumed(7))),
    ]
    return {"s2d": s2d, "d2s": d2s}


def _split_lz4(stream: bytes) -> list[tuple[str, bytes]]:
    """The compressed batches of one send, each whole (lengths from send_all_pages' own totals
    would not say where each ends): split by reading them back into memory one at a time."""
    memory = GuestMemory("8M")
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(stream), a.shutdown(socket.SHUT_WR)), daemon=True)
    writer.start()
    parts, taken = [], 0
    while taken < len(stream):
        got = memory.recv_pages(b)
        parts.append(("BATCH_LZ4", stream[taken:taken + got["wire_bytes"]]))
        taken += got["wire_bytes"]
    writer.join(30)
    a.close()
    b.close()
    assert len(parts) == 2 and taken == len(stream), "the 300 compressible pages go as two 1 MiB-or-less LZ4 batches"
    return parts


def _whole(messages) -> bytes:
    return b"".join(data for _, data in messages)


class Ends:
    """The two ends of a connection through a proxy to ``target()``: each writes its script and
    reads until EOF or a reset; all bounded. ``run`` may be called again (a reconnection)."""

    def __init__(self, script) -> None:
        self.script = script
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(20)
        self.socks = []

    def target(self):
        return self.server.getsockname()

    def run(self, proxy: FaultProxy):
        self.received = {"s2d": bytearray(), "d2s": bytearray()}
        self.ended = {"s2d": None, "d2s": None}
        self.send_reset = {"s2d": False, "d2s": False}
        try:
            client = socket.create_connection(proxy.address, timeout=20)
        except ConnectionResetError:  # a reset as the connection opens can beat connect()'s return
            client, self.ended["d2s"] = None, "reset"
        server, _ = self.server.accept()
        server.settimeout(20)
        self.socks += [s for s in (client, server) if s is not None]
        self.threads = []
        for sock, send, recv in ((client, "s2d", "d2s"), (server, "d2s", "s2d")):
            if sock is None:
                continue
            self.threads += [threading.Thread(target=self._send, args=(sock, send, _whole(self.script[send])), daemon=True),
                             threading.Thread(target=self._recv, args=(sock, recv), daemon=True)]
        for t in self.threads:
            t.start()
        return self

    def _send(self, sock, direction, data):
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except ConnectionResetError:
            self.send_reset[direction] = True  # a reset is reported once: to the write, or to the read
        except OSError:
            pass  # a write after the proxy's FIN; the reader says what arrived

    def _recv(self, sock, direction):
        try:
            while data := sock.recv(1 << 20):
                self.received[direction] += data
            self.ended[direction] = "eof"
        except ConnectionResetError:
            self.ended[direction] = "reset"
        except OSError as err:
            self.ended[direction] = f"error {err}"

    def saw_reset(self, direction):
        """Whether the end receiving ``direction`` learnt of a reset: by its read, or by its own
        write first (a reset is reported once)."""
        other = "d2s" if direction == "s2d" else "s2d"
        return self.ended[direction] == "reset" or (self.ended[direction] == "eof" and self.send_reset[other])

    def wait_received(self, direction, count, timeout=20):
        deadline = time.monotonic() + timeout
        while len(self.received[direction]) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.received[direction])

    def join(self):
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "an end is still blocked"

    def close(self):
        for s in (*self.socks, self.server):
            s.close()


def _prefix(script, direction, after, inside):
    return sum(len(data) for _, data in script[direction][:after]) + (inside or 0)


def test_a_dry_run_logs_every_message_in_both_directions_and_changes_no_byte(script):
    ends = Ends(script)
    with FaultProxy(ends.target()) as proxy:
        ends.run(proxy).join()
        assert proxy.wait_quiet(20)
        log = proxy.log
    ends.close()
    for direction in ("s2d", "d2s"):
        assert bytes(ends.received[direction]) == _whole(script[direction]) and ends.ended[direction] == "eof"
        mine = [m for m in log if m.direction == direction]
        assert [(m.index, m.kind, m.length) for m in mine] == [
            (i, kind, len(data)) for i, (kind, data) in enumerate(script[direction], 1)]
        assert proxy.message_count(direction) == len(script[direction])
    assert proxy.errors == [] and not proxy.fired
    by_kind = {m.kind: m for m in log}
    assert by_kind["BATCH"].detail.endswith("303 data + 1745 zero pages"), "the range table was read"
    assert by_kind["MEMORY"].detail == "round 1 FINAL" and by_kind["ACCEPT"].detail == "stage auth"


POINTS = [  # direction, after_message, inside_bytes
    ("s2d", 0, None),  # as the connection opens
    ("s2d", 0, 10),  # inside HELLO's header
    ("s2d", 2, None),  # after MEMORY: before the first batch
    ("s2d", 2, 30),  # inside the batch header
    ("s2d", 2, 60),  # inside its range table
    ("s2d", 2, 600_000),  # inside its page data
    ("s2d", 5, 100),  # inside the first LZ4 batch's block
    ("s2d", 9, None),  # after the unknown TYPE_99 frame
    ("s2d", 11, None),  # after the last message
    ("d2s", 1, None),
    ("d2s", 3, 7),
]


@pytest.mark.parametrize("action", ["cut", "reset", "stall"])
@pytest.mark.parametrize("direction,after,inside", POINTS, ids=[f"{d}-{a}-{i}" for d, a, i in POINTS])
def test_each_action_lands_at_exactly_the_point_asked_for(script, action, direction, after, inside):
    other = "d2s" if direction == "s2d" else "s2d"
    ends = Ends(script)
    proxy = FaultProxy(ends.target(), direction=direction, after_message=after, inside_bytes=inside, action=action)
    try:
        ends.run(proxy)
        assert proxy.wait_fired(20), proxy.errors
        expected = _prefix(script, direction, after, inside)
        full = _whole(script[direction])
        if after:
            assert proxy.fired_at[:3] == (direction, after, script[direction][after - 1][0])
        if action == "stall":
            assert ends.wait_received(direction, expected) == expected
            time.sleep(0.3)  # nothing more may arrive while it stalls, however long that is
            assert bytes(ends.received[direction]) == full[:expected], "exactly the bytes before the point, none after"
            assert ends.ended[direction] is None, "a stall keeps the connection open"
            proxy.release()
            ends.join()
            for d in ("s2d", "d2s"):
                assert bytes(ends.received[d]) == _whole(script[d]) and ends.ended[d] == "eof", "forwarding resumed byte-exact"
            assert [m[:3] for m in proxy.log if m.direction == direction][-1] == (direction, len(script[direction]),
                                                                                  script[direction][-1][0])
        else:
            ends.join()
            assert bytes(ends.received[direction]) == full[:expected], "exactly the bytes before the point, none after"
            assert ends.ended[direction] == "eof" if action == "cut" else ends.saw_reset(direction)
            assert _whole(script[other]).startswith(bytes(ends.received[other]))
            assert ends.ended[other] in ("eof", "reset")
            assert proxy.message_count(direction) == after
        assert proxy.errors == []
    finally:
        proxy.close()
        ends.close()


def test_after_the_fault_a_reconnecting_peer_is_relayed_untouched(script):
    ends = Ends(script)
    with FaultProxy(ends.target(), after_message=2, action="reset") as proxy:
        ends.run(proxy).join()
        assert proxy.fired and ends.saw_reset("s2d")
        ends.run(proxy).join()  # the source connects again
        assert proxy.wait_quiet(20)
        for d in ("s2d", "d2s"):
            assert bytes(ends.received[d]) == _whole(script[d]) and ends.ended[d] == "eof"
        assert proxy.message_count("s2d", connection=1) == len(script["s2d"])
        assert proxy.message_count("s2d", connection=0) == 2
    ends.close()


def test_accept_many_false_refuses_a_second_connection(script):
    ends = Ends(script)
    with FaultProxy(ends.target(), accept_many=False) as proxy:
        ends.run(proxy).join()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=10).close()
    ends.close()


def test_once_its_target_refuses_the_proxy_refuses_too_as_the_target_itself_would():
    # A source reconnecting to a dead destination is told "refused" at once, which it takes to
    # mean nobody holds the guest; a proxy accepting only to reset would keep it retrying.
    nothing = socket.create_server(("127.0.0.1", 0))
    target = nothing.getsockname()
    nothing.close()  # nothing listens at the target now
    with FaultProxy(target) as proxy:
        # The first connection is accepted and reset (the proxy learns only then that nothing
        # listens behind it); on loopback the reset can beat connect() itself.
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(proxy.address, timeout=10) as first:
                first.settimeout(10)
                if first.recv(1) == b"":
                    raise ConnectionResetError("closed")  # an orderly close is no better than a reset here
        # A few tries, far fewer than the connections the proxy accepts in all (MAX_CONNECTIONS,
        # after which it stops listening anyway).
        tries = 5
        assert tries < MAX_CONNECTIONS
        for _ in range(tries):
            try:
                socket.create_connection(proxy.address, timeout=10).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:
                pass  # connected while the proxy was letting go of its listener
            time.sleep(0.2)
        else:
            raise AssertionError(f"the proxy still accepted {tries} connections after its target refused")
        assert any("cannot reach" in e for e in proxy.errors), proxy.errors


def test_a_stall_with_seconds_heals_by_itself(script):
    ends = Ends(script)
    with FaultProxy(ends.target(), direction="d2s", after_message=1, action="stall", stall_seconds=0.5) as proxy:
        ends.run(proxy).join()  # no release(): the stall ends on its own
        for d in ("s2d", "d2s"):
            assert bytes(ends.received[d]) == _whole(script[d])
        assert proxy.fired and proxy.errors == []
    ends.close()


def _one_way(proxy_kwargs, data: bytes):
    """Send ``data`` one way through a proxy; returns (what arrived, the proxy's log and errors)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(20)
    with FaultProxy(server.getsockname(), **proxy_kwargs) as proxy:
        client = socket.create_connection(proxy.address, timeout=20)
        peer, _ = server.accept()
        peer.settimeout(20)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := peer.recv(1 << 20):
            got += chunk
        for s in (client, peer, server):
            s.close()
        assert proxy.wait_quiet(20)
        return bytes(got), proxy.log, proxy.errors, proxy.fired


def test_a_stream_that_is_not_the_protocol_is_named_and_still_forwarded():
    hello = P.encode_frame(T.HELLO, b"h" * 40)
    data = hello + b"GARBAGE, not a frame" + bytes(1000)
    got, log, errors, fired = _one_way({"after_message": 3}, data)
    assert got == data, "what the proxy cannot read it forwards untouched"
    assert [m[:3] for m in log] == [("s2d", 1, "HELLO")]
    assert errors[0] == ("connection 0 s2d: byte 64 (after message 1): neither a frame (VMMG) nor a page batch (VMPB) "
                         "starts here: first bytes 47 41 52 42; the rest of this direction is forwarded unread")
    assert "cannot be placed" in errors[1] and not fired, "a fault it cannot place is said, not guessed"


def test_a_batch_whose_length_disagrees_with_its_range_table_is_named(script):
    batch = bytearray(dict(script["s2d"])["BATCH"])
    declared = int.from_bytes(batch[24:32], "little")
    batch[24:32] = (declared + 8).to_bytes(8, "little")  # the payload length field (batch.rs offset 24)
    got, log, errors, _ = _one_way({}, bytes(batch))
    assert got == bytes(batch) and log == []
    assert errors == [f"connection 0 s2d: byte 0 (before any message): page batch of 303 data pages declares a payload "
                      f"of {declared + 8} bytes, expected {declared}; the rest of this direction is forwarded unread"]


def test_inside_bytes_past_the_message_end_is_an_error_and_nothing_fires(script):
    data = _whole(script["s2d"][:3])
    got, _, errors, fired = _one_way({"after_message": 1, "inside_bytes": 32}, data)  # MEMORY is 32 bytes
    assert got == data and not fired
    assert errors == ["connection 0 s2d: inside_bytes=32 is not inside message 2 (MEMORY, 32 bytes); nothing was faulted"]


@pytest.mark.parametrize("kwargs,message", [
    ({"direction": "up"}, "direction must be one of s2d, d2s; got 'up'"),
    ({"action": "drop"}, "action must be one of cut, reset, stall; got 'drop'"),
    ({"after_message": -1}, "after_message must be a message count from 0, a message type's name, or None for a dry run; got -1"),
    ({"after_message": "COMMIT_AKC"}, "after_message names no message type: 'COMMIT_AKC'"),
    ({"inside_bytes": 5}, "inside_bytes must be a byte count from 1, with after_message; got 5"),
    ({"after_message": 1, "inside_bytes": 0}, "inside_bytes must be a byte count from 1, with after_message; got 0"),
    ({"after_message": 1, "stall_seconds": 2}, "stall_seconds goes with action='stall' and must be positive; got 2"),
])
def test_bad_arguments_are_refused_with_what_was_wrong(kwargs, message):
    with pytest.raises(ValueError) as err:
        FaultProxy(("127.0.0.1", 1), **kwargs)
    assert str(err.value) == message


def test_fault_points_list_every_boundary_and_a_byte_inside_each_large_message(script):
    log = [Message(d, i, kind, len(data)) for d in ("s2d", "d2s") for i, (kind, data) in enumerate(script[d], 1)]
    points = fault_points(log, actions=("cut",))
    boundaries = [(p.direction, p.after_message) for p in points if p.inside_bytes is None]
    assert boundaries == [("s2d", k) for k in range(12)] + [("d2s", k) for k in range(1, 5)]
    inside = [(p.direction, p.after_message + 1, p.label) for p in points if p.inside_bytes is not None]
    large = [(m.direction, m.index) for m in log if m.length > 4096]
    assert [(d, i) for d, i, _ in inside] == large == [("s2d", 3), ("s2d", 6), ("s2d", 10)]
    assert inside[0][2] == f"cut at byte {len(script['s2d'][2][1]) // 2} of s2d 3 BATCH"
    assert all(0 < p.inside_bytes < log[p.after_message].length for p in points if p.inside_bytes)
    assert len(fault_points(log)) == 3 * len(points)
    with pytest.raises(ValueError, match="action must be one of cut, reset, stall; got 'kill'"):
        fault_points(log, actions=("kill",))


# ---- real vmmrun processes --------------------------------------------------------------------
class Pair:
    """A source vmmrun (src0, abtest) and a destination (dst0) listening on loopback; a context
    manager that kills both at its end. ``paused``: the guest starts paused at an instruction
    count (as --pause-at=N), so a migration of it sends the same messages every run."""

    def __init__(self, tmp_path, *, sweeps=2000, paused=None, **guest_extra):
        self.tmp, self.sweeps = tmp_path, sweeps
        self.port = free_port()
        self.target = ("127.0.0.1", self.port)
        self.src_console, self.dst_console = tmp_path / "src.log", tmp_path / "dst.log"
        pause = [f"--pause-at={paused}"] if paused else []
        self.dest = start_vmmrun(tmp_path, "-m", "32M", "-l", f"com1,{self.dst_console}", "-R", f"127.0.0.1:{self.port}", "dst0")
        self.source = start_vmmrun(tmp_path, *abtest_args(sweeps, **guest_extra), "-l", f"com1,{self.src_console}", *pause, "src0")
        try:
            wait_for_listener("127.0.0.1", self.port, self.dest)
            wait_for_socket(tmp_path, "src0", self.source)
            if paused:
                wait_for_state(tmp_path, "src0", "paused")
        except BaseException:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def migrate(self, proxy, *flags):
        return vmmctl(self.tmp, "--vm=src0", "--migrate-live", "127.0.0.1", str(proxy.port), "--json", *flags, timeout=180)

    def dry_run(self, migrate=None):
        """Migrate through a proxy that faults nothing (``migrate(proxy)``, default ``self.migrate``);
        returns the result and the proxy's log, once every connection ended."""
        with FaultProxy(self.target) as proxy:
            result = (migrate or self.migrate)(proxy)
            assert result.returncode == 0, result.stderr
            assert proxy.wait_quiet(30)
            assert proxy.errors == [] and not proxy.fired
            return result, proxy.log

    def source_state(self):
        return json.loads(vmmctl(self.tmp, "--vm=src0", "--status", "--json").stdout)["state"]

    def dest_failure(self):
        """The destination's exit status and its last stderr line (bounded)."""
        status = self.dest.wait(timeout=60)
        return status, self.dest.stderr.read().strip().splitlines()[-1]

    def stop(self):
        stop(self.source)
        stop(self.dest)


def check_log_against_the_engines(log, stats):
    """The proxy's lengths against what the engines counted themselves: every round's batches
    against its MEMORY_END totals, and all the source sent against its bytes_total."""
    s2d = [m for m in log if m.direction == "s2d"]
    kinds = [m.kind for m in s2d]
    assert kinds[:3] == ["HELLO", "AUTH", "SPEC"] and kinds[-4:] == ["STATE", "COMMIT_REQUEST", "COMMITTED", "RELEASED"]
    assert [m.kind for m in log[:6]] == ["HELLO", "CHALLENGE", "AUTH", "ACCEPT", "SPEC", "ACCEPT"]
    assert [m.kind for m in log[-5:]] == ["COMMIT_REQUEST", "COMMIT_ACK", "COMMITTED", "RESUMED", "RELEASED"]
    rounds = []
    i = 3
    while kinds[i] == "MEMORY":
        end = kinds.index("MEMORY_END", i)
        memory, totals = P.decode_memory(s2d[i].payload), P.decode_memory_end(s2d[end].payload)
        batches = s2d[i + 1:end - 1]
        assert kinds[end - 1] == "EMPTY_BATCH" and all(k.startswith("BATCH") for k in kinds[i + 1:end - 1])
        assert memory.round == totals.round == len(rounds)
        assert len(batches) == totals.batches and sum(b.length for b in batches) == totals.wire_bytes
        rounds.append((memory, batches))
        i = end + 1
    parts = 0
    while kinds[i + parts] == "STATE_PART":  # protocol 9, where the source sends the state in parts
        parts += 1
    assert parts == stats["state_parts"] - 1, (parts, stats["state_parts"])
    assert kinds[i + parts:] == ["STATE", "COMMIT_REQUEST", "COMMITTED", "RELEASED"]
    assert len(rounds) == stats["round_count"] and rounds[-1][0].flags & P.MemoryFlags.FINAL
    # Version 8: each round that is not final is answered with ROUND_DONE naming it, after its
    # MEMORY_END and before the source starts the next round.
    d2s = [m for m in log if m.direction == "d2s"]
    assert [m.kind for m in d2s] == ["CHALLENGE", "ACCEPT", "ACCEPT", *["ROUND_DONE"] * (len(rounds) - 1), "COMMIT_ACK", "RESUMED"]
    order = [(m.direction, m.kind) for m in log if m.kind in ("MEMORY", "MEMORY_END", "ROUND_DONE")]
    assert order == [*[("s2d", "MEMORY"), ("s2d", "MEMORY_END"), ("d2s", "ROUND_DONE")] * (len(rounds) - 1),
                     ("s2d", "MEMORY"), ("s2d", "MEMORY_END")]
    assert [P.decode_round_done(m.payload) for m in d2s if m.kind == "ROUND_DONE"] == list(range(len(rounds) - 1))
    assert sum(m.length for m in s2d) == stats["bytes_total"], "the source counts what it sent"
    return rounds


@pytest.mark.parametrize("flags", [(), ("--compress", "lz4")], ids=["plain", "lz4"])
def test_a_dry_run_of_a_live_migration_logs_the_protocol_and_changes_nothing(tmp_path, flags):
    # abtest rewrites 2M..8M flat out from the moment it is resumed, right before the migration
    # starts: the rounds carry dirty pages; with lz4 (one stream, the default) most go compressed.
    # The link is capped so round 0 lasts about 150 ms: the guest gets a CPU during it even on a
    # loaded machine (uncapped, round 0 could end before the guest's thread ran at all, and no
    # later round had a page). Two live rounds, then the switch, keep the run short.
    sweeps = 40_000
    link = ["--bandwidth", "40M", "--max-rounds", "2", "--policy", "switch-over"]
    with Pair(tmp_path, sweeps=sweeps, paused=1, end="8M") as pair:
        result, log = pair.dry_run(lambda proxy: live_migrate_in_process(
            tmp_path, "127.0.0.1", proxy.port, ["--downtime-ms", "10", *link, *flags]))
        stats = json.loads(result.stdout)
        assert stats["bandwidth_cap"] == 40 * MiB, "the link flags reached the migration"
        rounds = check_log_against_the_engines(log, stats)
        batch_kinds = [b.kind for _, batches in rounds for b in batches]
        assert stats["round_count"] >= 2 and any(batches for _, batches in rounds[1:]), "dirty pages went in later rounds"
        assert batch_kinds.count("BATCH_LZ4") == stats["compressed_batches"]
        assert stats["compressed_batches"] > 0 if flags else set(batch_kinds) == {"BATCH"}
        assert pair.source.wait(timeout=120) == 0
        assert pair.dest.wait(timeout=120) == 1
        pages = (8 * MiB - 2 * MiB) // 4096
        assert pair.src_console.read_text() + pair.dst_console.read_text() == expected_console(sweeps, pages)


def test_a_cut_after_auth_leaves_the_source_running_and_the_destination_waiting(tmp_path):
    with Pair(tmp_path, sweeps=100_000) as pair:
        with FaultProxy(pair.target, direction="s2d", after_message=2, action="cut") as proxy:
            result = pair.migrate(proxy)
            assert proxy.fired and proxy.fired_at[:3] == ("s2d", 2, "AUTH")
            assert [m.kind for m in proxy.log] == ["HELLO", "CHALLENGE", "AUTH"]
        assert result.returncode == 1 and "the guest keeps running here" in result.stderr
        assert pair.source_state() == "running"
        # Before its SPEC is accepted the connection is a stranger's: the destination waits on,
        # and names it when it is told to stop.
        time.sleep(0.3)
        assert pair.dest.poll() is None
        pair.dest.terminate()
        status, line = pair.dest_failure()
        assert status == 4 and line.startswith("vmmrun: dst0:   note: a connection that did not become the migration: 127.0.0.1:")
        assert line.endswith("peer closed the connection while sending a frame header in state await-spec (0 of 24 bytes arrived)"), line


def test_a_reset_inside_round_0s_first_batch_leaves_the_source_running(tmp_path):
    with Pair(tmp_path, sweeps=100_000) as pair:
        # s2d 4 is round 0's MEMORY; a megabyte into the batch after it the connection is reset.
        with FaultProxy(pair.target, direction="s2d", after_message=4, inside_bytes=MiB, action="reset") as proxy:
            result = pair.migrate(proxy)
            assert proxy.fired and proxy.fired_at.detail == "round 0 ALL_PAGES"
        assert result.returncode == 1 and "round 0" in result.stderr and "the guest keeps running here" in result.stderr
        assert pair.source_state() == "running"
        status, line = pair.dest_failure()
        assert status == 4 and line.startswith("vmmrun: dst0: incoming migration failed: round 0: receiving page data")
        assert "reset" in line


PAUSED_AT = 1_000_000


@pytest.fixture(scope="module")
def paused_log(tmp_path_factory):
    """The message log of a live migration of a paused guest: the same messages every run."""
    with Pair(tmp_path_factory.mktemp("paused"), paused=PAUSED_AT) as pair:
        return pair.dry_run()[1]


def test_kill_9_of_the_destination_at_the_state_phase_leaves_the_source_guest(tmp_path, paused_log):
    point = phase_point(paused_log, "state")
    # The state's first frame: STATE, or its first part where the source sends parts (protocol 9).
    assert paused_log[[m[:2] for m in paused_log].index(("s2d", point["after_message"] + 1))].kind in ("STATE_PART", "STATE")
    with Pair(tmp_path, paused=PAUSED_AT) as pair:
        with kill_at_phase(pair.target, pair.dest, paused_log, "state") as proxy:
            result = pair.migrate(proxy)
            assert proxy.fired and proxy.fired_at.kind == "MEMORY_END", "the destination died with the final round, before STATE"
            assert pair.dest.returncode == -9
        assert result.returncode == 1 and "the guest stays here, paused" in result.stderr, result.stderr
        assert pair.source_state() == "paused", "the source owns its guest again, as it was"
        assert vmmctl(tmp_path, "--vm=src0", "--resume").returncode == 0
        assert pair.source.wait(timeout=120) == 1
        assert pair.src_console.read_text().endswith("all counters 2000\n"), "and it runs to its end, nothing lost"


def test_kill_9_of_the_source_at_the_commit_phase_leaves_the_destination_one_safe_state(tmp_path, paused_log):
    with Pair(tmp_path, paused=PAUSED_AT) as pair:
        with kill_at_phase(pair.target, pair.source, paused_log, "commit") as proxy:
            result = pair.migrate(proxy)
            assert proxy.fired and proxy.fired_at.kind == "STATE"
        assert result.returncode == 1 and pair.source.returncode == -9
        # Whether the dead source's COMMIT_REQUEST was already on its way decides: without it the
        # destination discards (exit 4); with it, it answered COMMIT_ACK and holds the guest in
        # doubt (protocol 5), which its operator settles: the source is gone, so run it there.
        deadline = time.monotonic() + 30
        state = None
        while pair.dest.poll() is None and time.monotonic() < deadline:
            out = vmmctl(tmp_path, "--vm=dst0", "--status", "--json")
            state = json.loads(out.stdout)["state"] if out.returncode == 0 else None
            if state == "in-doubt":
                break
            time.sleep(0.1)
        if state == "in-doubt":
            ran = vmmctl(tmp_path, "--vm=dst0", "--migrate-resolve=run-here", "--force")
            assert ran.returncode == 0, ran.stderr
            # The guest runs there from where it paused, to its end (on a fast host before any
            # status query could see it running): nothing lost.
            assert pair.dest.wait(timeout=120) == 1
            assert pair.dst_console.read_text().endswith("all counters 2000\n")
        else:
            status, line = pair.dest_failure()
            assert status == 4 and line.startswith("vmmrun: dst0: incoming migration failed:")
            assert not pair.dst_console.exists() or pair.dst_console.read_text() == "", "the destination never ran the guest"


def test_parallel_streams_are_logged_per_connection_and_add_up_to_the_rounds(tmp_path):
    with Pair(tmp_path, paused=PAUSED_AT) as pair:
        result, log = pair.dry_run(lambda proxy: pair.migrate(proxy, "--streams", "3"))
        stats = json.loads(result.stdout)
        main = [m.kind for m in log if m.connection == 0]
        assert main[:8] == ["HELLO", "CHALLENGE", "AUTH", "ACCEPT", "SPEC", "ACCEPT", "STREAMS", "STREAMS_TOKEN"]
        for c in (1, 2):
            s2d = [m for m in log if m.connection == c and m.direction == "s2d"]
            d2s = [(m.kind, m.detail) for m in log if m.connection == c and m.direction == "d2s"]
            assert s2d[0].kind == "JOIN" and d2s == [("ACCEPT", "stage join")]
            assert [m.kind for m in s2d[1:]].count("EMPTY_BATCH") == stats["round_count"], "each stream ends each round"
        totals = [P.decode_memory_end(m.payload) for m in log if m.kind == "MEMORY_END"]
        batches = [m for m in log if m.kind.startswith("BATCH")]
        assert stats["streams"] == 3 and {m.connection for m in batches} <= {0, 1, 2}
        assert sum(m.length for m in batches) == sum(t.wire_bytes for t in totals)
        assert len(batches) == sum(t.batches for t in totals)
        assert pair.source.wait(timeout=120) == 0


def test_a_reset_of_one_data_stream_fails_the_round_and_the_source_keeps_its_guest(tmp_path):
    with Pair(tmp_path, paused=PAUSED_AT) as pair:
        # Stream 1 (the second connection): after its JOIN, 20 bytes into the header of what follows
        # (a batch, or only the round's empty one: which stream takes which batch is a race).
        with FaultProxy(pair.target, connection=1, after_message=1, inside_bytes=20, action="reset") as proxy:
            result = pair.migrate(proxy, "--streams", "3")
            assert proxy.fired and proxy.fired_at[:3] == ("s2d", 1, "JOIN") and proxy.fired_at.connection == 1
        # Where a send of the source fails, it names that stream. The destination closes every stream when
        # stream 1 fails, so another stream's send can fail before stream 1's does: the source cannot tell
        # cause from consequence, and the destination's report below is the one that names stream 1.
        # Where every send fit in the buffers before the reset, the source is waiting for ROUND_DONE and
        # learns it from the destination's ABORT, which names stream 1.
        assert result.returncode == 1, result.stderr
        assert re.search(r"connection lost .*stream [0-2]: |destination aborted: round 0, stream 1: ", result.stderr), result.stderr
        assert "the guest stays here, paused" in result.stderr, result.stderr
        assert pair.source_state() == "paused"
        status, line = pair.dest_failure()
        assert status == 4 and line.startswith("vmmrun: dst0: incoming migration failed: round 0, stream 1:")
