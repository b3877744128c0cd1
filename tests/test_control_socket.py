"""The control socket: 0600, owner only, clear errors for missing, stale and malformed."""

import errno
import os
import pathlib
import shutil
import tempfile
import socket
import stat
import struct
import threading

import pytest

from vmmpy.cli import vmmctl
from vmmpy.runtime.control import ControlClient, ControlError, ControlServer, list_vms, recv_message, send_message


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


def test_other_users_are_refused():
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")

    directory = tempfile.mkdtemp(prefix="vmmpy-ctl-")  # world-traversable, unlike pytest's tmp_path
    calls = []
    server = ControlServer("vm0", {"status": lambda r, p: calls.append(r)}, directory=pathlib.Path(directory))
    server.start()
    result = {}

    def as_nobody():
        # A forked child that drops to uid 65534 and asks; the server must refuse it by uid even
        # if the file mode were relaxed, so relax it to prove the SO_PEERCRED check.
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(server.path))
                    send_message(sock, {"cmd": "status"})
                    reply = recv_message(sock)
                os._exit(0 if (reply.get("ok") is False and reply.get("errno") == errno.EACCES) else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        result["status"] = os.waitstatus_to_exitcode(status)

    try:
        os.chmod(directory, 0o755)
        os.chmod(server.path, 0o666)
        thread = threading.Thread(target=as_nobody)
        thread.start()
        thread.join(timeout=30)
    finally:
        server.close()
        shutil.rmtree(directory)
    assert result.get("status") == 0, f"child exit {result}"
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
