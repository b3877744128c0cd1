"""The control socket: 0600, owner only, clear errors for missing, stale and malformed."""

import errno
import json
import os
import pathlib
import shutil
import socket
import stat
import struct
import subprocess
import tempfile

import pytest

from vmmpy.cli import vmmctl
from vmmpy.runtime.control import ControlClient, ControlError, ControlServer, list_vms, recv_message


@pytest.fixture
def server(tmp_path):
    calls = []

    def status(request, progress):
        calls.append(request)
        return {"state": "running", "echo": request.get("value")}

    def slow(request, progress):
        for step in range(3):
            progress({"step": step})
        return "done"

    def broken(request, progress):
        raise OSError(errno.EBUSY, "vcpu 0 is busy")

    srv = ControlServer("vm0", {"status": status, "slow": slow, "broken": broken}, directory=tmp_path)
    srv.start()
    srv.calls = calls
    yield srv
    srv.close()


def test_socket_is_private_to_its_owner(server):
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_request_and_result(server, tmp_path):
    client = ControlClient("vm0", tmp_path)
    assert client.request("status", value=7) == {"state": "running", "echo": 7}
    assert server.calls == [{"cmd": "status", "value": 7}]


def test_progress_messages_arrive_before_the_result(server, tmp_path):
    seen = []
    assert ControlClient("vm0", tmp_path).request("slow", on_progress=seen.append) == "done"
    assert seen == [{"step": 0}, {"step": 1}, {"step": 2}]


def test_handler_errors_come_back_with_errno(server, tmp_path):
    with pytest.raises(ControlError, match="vcpu 0 is busy") as err:
        ControlClient("vm0", tmp_path).request("broken")
    assert err.value.errno == errno.EBUSY


def test_unknown_command_lists_the_known_ones(server, tmp_path):
    with pytest.raises(ControlError, match="unknown control command 'launch'.*broken, slow, status") as err:
        ControlClient("vm0", tmp_path).request("launch")
    assert err.value.errno == errno.EINVAL


def test_malformed_requests_are_answered_not_crashed_on(server):
    for payload in (b"\xff\xfe", b"[1, 2]", b"{not json"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(server.path))
            sock.sendall(struct.pack("<I", len(payload)) + payload)
            reply = recv_message(sock)
            assert reply["ok"] is False and reply["errno"] == errno.EINVAL
            assert "malformed control request" in reply["error"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # an absurd length
        sock.settimeout(10)
        sock.connect(str(server.path))
        sock.sendall(struct.pack("<I", 0xFFFFFFFF))
        assert "exceeds" in recv_message(sock)["error"]
    # and the server still serves
    assert ControlClient("vm0", server.path.parent).request("status")["state"] == "running"


def test_missing_vm_is_named(tmp_path):
    with pytest.raises(ControlError, match="no VM named 'ghost' is running") as err:
        ControlClient("ghost", tmp_path).request("status")
    assert err.value.errno == errno.ENOENT


def test_stale_socket_is_reported_then_replaced(tmp_path):
    path = tmp_path / "old.ctl"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed vmmrun leaves behind
    with pytest.raises(ControlError, match="stale") as err:
        ControlClient("old", tmp_path).request("status")
    assert err.value.errno == errno.ECONNREFUSED
    assert list_vms(tmp_path) == [("old", False)]
    srv = ControlServer("old", {"status": lambda r, p: "alive"}, directory=tmp_path)
    srv.start()
    try:
        assert ControlClient("old", tmp_path).request("status") == "alive"
        assert list_vms(tmp_path) == [("old", True)]
    finally:
        srv.close()
    assert not path.exists(), "closing the server removes its socket"


def test_a_second_server_for_a_live_name_is_refused(server, tmp_path):
    with pytest.raises(ControlError, match="already running") as err:
        ControlServer("vm0", {}, directory=tmp_path).start()
    assert err.value.errno == errno.EEXIST


def test_a_refused_second_server_leaves_the_first_ones_socket(server, tmp_path):
    second = ControlServer("vm0", {}, directory=tmp_path)
    with pytest.raises(ControlError) as refused:
        second.start()
    second.close()  # what vmmrun's cleanup does after the refusal
    assert ControlClient("vm0", tmp_path).request("status") == {"state": "running", "echo": None}
    assert refused.value.errno == errno.EEXIST
    assert f"a VM named 'vm0' is already running (process {os.getpid()}, control socket {server.path})" in str(refused.value)


def test_close_leaves_a_socket_it_did_not_bind(tmp_path):
    srv = ControlServer("vm0", {}, directory=tmp_path)
    srv.start()
    srv.path.unlink()  # someone else's file takes the path now
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(srv.path))
    try:
        srv.close()
        assert srv.path.exists(), "close() removes only the socket it bound"
    finally:
        other.close()


def test_servers_started_at_the_same_instant_yield_exactly_one(tmp_path):
    import threading

    for attempt in range(5):
        barrier = threading.Barrier(4)
        won, lost = [], []

        def start(server):
            barrier.wait(10)
            try:
                server.start()
                won.append(server)
            except ControlError as err:
                lost.append(err)

        servers = [ControlServer(f"race{attempt}", {"status": lambda r, p: "up"}, directory=tmp_path) for _ in range(4)]
        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        try:
            assert len(won) == 1 and len(lost) == 3, (won, lost)
            assert all(err.errno == errno.EEXIST for err in lost)
            assert ControlClient(f"race{attempt}", tmp_path).request("status") == "up"
        finally:
            for s in servers:
                s.close()
        assert not (tmp_path / f"race{attempt}.ctl").exists() and not (tmp_path / f"race{attempt}.lock").exists()


def test_a_name_released_between_open_and_lock_is_claimed_once(tmp_path, monkeypatch):
    """Server B opens the lock file, then A closes (removing that file) before B locks it: B's
    lock on the unlinked file must not count, or C, creating a fresh file, would win as well."""
    from vmmpy.runtime import control

    a = ControlServer("vm0", {}, directory=tmp_path)
    a.start()
    real_flock = control.fcntl.flock
    calls = []

    def flock_after_a_closes(fd, how):
        if not calls:
            a.close()
        calls.append(fd)
        return real_flock(fd, how)

    monkeypatch.setattr(control.fcntl, "flock", flock_after_a_closes)
    b = ControlServer("vm0", {"status": lambda r, p: "b"}, directory=tmp_path)
    c = ControlServer("vm0", {}, directory=tmp_path)
    try:
        b.start()
        assert len(calls) == 2, "B tried again on a fresh lock file"
        with pytest.raises(ControlError, match="already running"):
            c.start()
        assert ControlClient("vm0", tmp_path).request("status") == "b"
    finally:
        for srv in (a, b, c):
            srv.close()


CLIENT_AS_ANOTHER_USER = """
import json, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
data = json.dumps({"cmd": "status"}).encode()
try:
    sock.sendall(struct.pack("<I", len(data)) + data)
except BrokenPipeError:
    pass  # the server may refuse before reading a byte; its answer is already waiting
length = struct.unpack("<I", sock.recv(4, socket.MSG_WAITALL))[0]
print(sock.recv(length, socket.MSG_WAITALL).decode())
"""


def test_other_users_are_refused():
    """Even with the socket file opened up to everyone, a peer of another uid is refused by its
    credentials (SO_PEERCRED) before any command runs."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to connect as another uid")
    directory = tempfile.mkdtemp(prefix="vmmpy-ctl-")  # world-traversable, unlike pytest's tmp_path
    calls = []
    server = ControlServer("vm0", {"status": lambda r, p: calls.append(r)}, directory=pathlib.Path(directory))
    server.start()
    try:
        os.chmod(directory, 0o755)
        os.chmod(server.path, 0o666)
        # A system interpreter, not this venv's: the child runs as uid 65534, who cannot read /root.
        child = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
             CLIENT_AS_ANOTHER_USER, str(server.path)],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        server.close()
        shutil.rmtree(directory)
    assert child.returncode == 0, child.stderr
    reply = json.loads(child.stdout)
    assert reply["ok"] is False and reply["errno"] == errno.EACCES
    assert "refuses uid 65534" in reply["error"]
    assert calls == []


def test_vmmctl_reports_a_missing_vm_and_fails(tmp_path, capsys):
    assert vmmctl.main(["--vm=ghost", "--status", "--run-dir", str(tmp_path)]) == 1
    assert "no VM named 'ghost' is running" in capsys.readouterr().err


def test_vmmctl_accepts_both_option_spellings(server, tmp_path, capsys):
    assert vmmctl.main(["--vm", "vm0", "--status", f"--run-dir={tmp_path}"]) == 0
    assert "state: running" in capsys.readouterr().out
    assert vmmctl.main(["--vm=vm0", "--status", "--json", "--run-dir", str(tmp_path)]) == 0
    assert '"state": "running"' in capsys.readouterr().out


def test_vmmctl_list(server, tmp_path, capsys):
    assert vmmctl.main(["--list", "--run-dir", str(tmp_path)]) == 0
    assert "vm0\trunning" in capsys.readouterr().out


def test_vmmctl_needs_an_action(capsys):
    with pytest.raises(SystemExit) as exit_:
        vmmctl.main(["--vm=vm0"])
    assert exit_.value.code == 2
    assert "one of the arguments" in capsys.readouterr().err


def test_two_threads_closing_at_once_both_finish_and_the_socket_goes(tmp_path):
    # vmmrun's main thread and a destroy request's teardown thread close the server together;
    # neither may fail half way (which once left the socket file behind a finished vmmrun). A
    # slow shutdown holds the first closer inside it while the second arrives.
    import threading
    import time

    class SlowShutdown:
        def __init__(self, sock):
            self.sock = sock

        def shutdown(self, how):
            time.sleep(0.1)
            self.sock.shutdown(how)

        def __getattr__(self, name):
            return getattr(self.sock, name)

    srv = ControlServer("vm0", {"status": lambda req, progress: {}}, directory=tmp_path)
    srv.start()
    srv._sock = SlowShutdown(srv._sock)
    errors = []

    def close():
        try:
            srv.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=close) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(10)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert not srv.path.exists(), "the socket file is removed"


# -- a command that ends the guest returns once its name is free -----------------------------------

def test_wait_gone_sees_the_name_released_and_a_killed_holder(tmp_path):
    srv = ControlServer("vm0", {}, directory=tmp_path)
    srv.start()
    client = ControlClient("vm0", tmp_path)
    holder = client.name_holder()
    assert holder is not None and holder[2] == os.getpid()
    assert client.wait_gone(holder, timeout=0.2) is False, "the server still holds the name"
    srv.close()
    assert client.wait_gone(holder, timeout=0.2) is True
    assert client.name_holder() is None

    # A holder killed before it could remove its lock file: the file stays, the process is gone.
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    client.lock_path.write_text(f"{child.pid}\n")
    assert client.wait_gone(client.name_holder(), timeout=5) is True


def test_suspend_then_restore_under_the_same_name_at_once(tmp_path):
    """vmmctl --suspend returns only once the suspended vmmrun has let its name go, so the
    README's next command (vmmrun -r ... with the same name) is never refused as a duplicate."""
    from .procs import start_vmmrun, stop, wait_for_socket
    from .procs import vmmctl as run_vmmctl

    run_dir = tmp_path / "run"
    for attempt in range(3):  # each round: start (or restore), then suspend; the next starts at once
        args = ["-r", str(tmp_path / "vm0.ckp")] if attempt else ["--guest", "abtest", "-m", "64M"]
        proc = start_vmmrun(run_dir, *args, "vm0")
        try:
            wait_for_socket(run_dir, "vm0", proc)
            done = run_vmmctl(run_dir, "--vm=vm0", f"--suspend={tmp_path / 'vm0.ckp'}")
            assert done.returncode == 0, done.stderr
            assert ControlClient("vm0", run_dir).name_holder() is None, "vmmctl returned before the name was free"
            assert proc.wait(timeout=30) == 0
        finally:
            stop(proc)
