"""The control socket: how ``vmmctl`` talks to a running ``vmmrun``, like bhyve's checkpoint socket.

One Unix stream socket per VM at ``<run dir>/<vmname>.ctl``, mode 0600, refusing peers of another
user (SO_PEERCRED). The name is claimed first by an exclusive flock on ``<run dir>/<vmname>.lock``,
held for the server's life: of two servers started for one name at the same instant exactly one
wins, and a refused one touches nothing of the running one (its socket stays where it is). Each message is a little-endian u32 length then that many bytes of UTF-8 JSON.
A request is ``{"cmd": NAME, ...arguments}``; the server answers with zero or more progress
messages ``{"progress": {...}}`` and then exactly one final message, ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": TEXT, "errno": N}``.

The run directory is ``$VMMPY_RUN_DIR`` if set, else ``/run/vmmpy`` for root, else
``$XDG_RUNTIME_DIR/vmmpy`` or ``/tmp/vmmpy-<uid>``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import VmmpyError

_LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 20
SOCKET_SUFFIX = ".ctl"
LOCK_SUFFIX = ".lock"


class ControlError(VmmpyError, OSError):
    """A control-socket request failed; ``errno`` and the message say why."""


def guest_stays_here(state: str | None) -> str:
    """How a migration that did not happen leaves the source's guest, from its ``status`` state:
    a guest paused before it (``--pause-at``, ``--pause``) stays paused, and saying it runs would
    send its operator looking for output that never comes."""
    if state == "paused":
        return "the guest stays here, paused (vmmctl --resume runs it)"
    if state == "running":
        return "the guest keeps running here"
    return "the guest stays here, as it was before the migration"  # its vmmrun did not say


def run_dir() -> Path:
    # Our own rather than platformdirs' user_runtime_dir: that falls back to /run/user/UID, which
    # containers and ssh sessions without a login manager often lack; bhyve-like tools want /run.
    env = os.environ.get("VMMPY_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/vmmpy")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "vmmpy" if xdg else Path(f"/tmp/vmmpy-{os.getuid()}")


def socket_path(vmname: str, directory: Path | None = None) -> Path:
    return (directory or run_dir()) / f"{vmname}{SOCKET_SUFFIX}"


def valid_vm_name(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control socket closed by the peer")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > MAX_MESSAGE:
        raise ValueError(f"control message length {length} exceeds the {MAX_MESSAGE}-byte limit")
    try:
        message = json.loads(_recv_exact(sock, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"control message is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise ValueError("control message is not a JSON object")
    return message


# A handler gets the request and a `progress(dict)` callback, returns the result (JSON-able) or
# raises OSError/ValueError, which become error replies.
Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], Any]


class ControlServer:
    """Serves one VM's control socket on a background thread."""

    def __init__(self, vmname: str, handlers: dict[str, Handler], directory: Path | None = None) -> None:
        if not valid_vm_name(vmname):
            raise ValueError(f"VM name {vmname!r} is not valid: use letters, digits, '-', '_' and '.', at most 64")
        self.vmname = vmname
        self.handlers = handlers
        self.path = socket_path(vmname, directory)
        self.lock_path = self.path.with_name(f"{vmname}{LOCK_SUFFIX}")
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket this server bound
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._closed = threading.Event()  # the first close() has finished
        self._active: set[threading.Thread] = set()
        self._active_lock = threading.Lock()

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _claim_name(self.lock_path, self.vmname, self.path)
        try:
            self._bind()
        except BaseException:
            self._release_name()
            raise
        self._thread = threading.Thread(target=self._serve, name=f"control-{self.vmname}", daemon=True)
        self._thread.start()

    def _bind(self) -> None:
        # Holding the name's lock, any socket file at the path is a dead server's (it was killed
        # before it could remove it), unless a server that takes no lock answers on it.
        if self.path.exists() or self.path.is_symlink():
            if _socket_is_live(self.path):
                raise ControlError(errno.EEXIST, f"a VM named '{self.vmname}' is already running (control socket {self.path})")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        self._sock = sock

    def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight send their answer (a suspend ends the VM
        from inside its own request), then remove the socket (only the one this server bound,
        and only while the path still is that socket) and give up the name."""
        # Two threads may close at once (a destroy request's teardown and vmmrun's main thread).
        # The second waits for the first to finish: returning at once would let vmmrun's main
        # thread end the process while the other is between removing the socket and the lock file.
        with self._active_lock:
            first = not self._closing.is_set()
            self._closing.set()
        if not first:
            self._closed.wait(drain_timeout + 5)
            return
        try:
            self._close(drain_timeout)
        finally:
            self._closed.set()

    def _close(self, drain_timeout: float) -> None:
        with self._active_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._active_lock:
            active = [t for t in self._active if t is not threading.current_thread()]
        for thread in active:
            if thread.ident is not None:  # registered but not started yet: nothing to wait for
                thread.join(drain_timeout)
        with self._active_lock:
            bound, self._bound = self._bound, None
        if bound is not None:
            _unlink_if_same(self.path, bound)
        self._release_name()

    def _release_name(self) -> None:
        """Remove the lock file while still holding its lock, then drop the lock: a server
        waiting on the old file finds it unlinked and claims a fresh one (``_claim_name``)."""
        with self._active_lock:
            fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            st = os.fstat(fd)
            _unlink_if_same(self.lock_path, (st.st_dev, st.st_ino))
        finally:
            os.close(fd)

    def _serve(self) -> None:
        while not self._closing.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._handle_connection, args=(conn,), daemon=True)
            with self._active_lock:
                self._active.add(thread)
            thread.start()

    def _handle_connection(self, conn: socket.socket) -> None:
        try:
            self._handle_request(conn)
        finally:
            with self._active_lock:
                self._active.discard(threading.current_thread())

    def _handle_request(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(None)
            uid = _peer_uid(conn)
            if uid is not None and uid != os.geteuid():
                _reply_error(conn, errno.EACCES, f"control socket of VM '{self.vmname}' refuses uid {uid}: only its owner may control it")
                return
            try:
                request = recv_message(conn)
            except (ValueError, ConnectionError, OSError) as err:
                _reply_error(conn, errno.EINVAL, f"malformed control request: {err}")
                return
            cmd = request.get("cmd")
            handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                _reply_error(conn, errno.EINVAL, f"unknown control command {cmd!r}; this VM understands: {known}")
                return

            def progress(info: dict[str, Any]) -> None:
                try:
                    send_message(conn, {"progress": info})
                except OSError:
                    pass  # vmmctl went away; the operation goes on

            try:
                result = handler(request, progress)
            except OSError as err:
                _reply_error(conn, err.errno or errno.EIO, err.strerror or str(err))
            except (ValueError, TypeError, KeyError) as err:
                _reply_error(conn, errno.EINVAL, str(err))
            except Exception as err:  # a bug must answer, not hang vmmctl
                _reply_error(conn, errno.EIO, f"internal error handling {cmd!r}: {type(err).__name__}: {err}")
            else:
                try:
                    send_message(conn, {"ok": True, "result": result})
                except OSError:
                    pass


def _reply_error(conn: socket.socket, code: int, text: str) -> None:
    try:
        send_message(conn, {"ok": False, "errno": code, "error": text})
    except OSError:
        pass


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _claim_name(lock_path: Path, vmname: str, sock_path: Path) -> int:
    """An fd holding an exclusive flock on ``lock_path``, or ControlError(EEXIST) when another
    server holds it. After taking the lock the path must still name the locked file: a server
    that was closing may have unlinked it in between, and a lock on an unlinked file claims
    nothing (the next server would create a new file and lock that too)."""
    for _ in range(100):  # each retry means another server released the name meanwhile
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            by = f"process {holder}, " if holder else ""
            raise ControlError(errno.EEXIST, f"a VM named '{vmname}' is already running ({by}control socket {sock_path})") from None
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        try:
            now = os.stat(lock_path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise ControlError(errno.EAGAIN, f"could not claim the name '{vmname}': its lock file {lock_path} kept changing")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _unlink_if_same(path: Path, identity: tuple[int, int]) -> None:
    """Remove ``path`` only if it still is the file ``identity`` (st_dev, st_ino) names."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlClient:
    """Talks to one VM's control socket."""

    def __init__(self, vmname: str, directory: Path | None = None, timeout: float | None = 30.0) -> None:
        self.vmname = vmname
        self.path = socket_path(vmname, directory)
        self.timeout = timeout

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f"{self.vmname}{LOCK_SUFFIX}")

    def name_holder(self) -> tuple[int, int, int | None] | None:
        """Who holds this VM's name now: the lock file's (device, inode, pid), None when no
        server holds it. Taken before a request that ends the server, for :meth:`wait_gone`."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            return st.st_dev, st.st_ino, _read_pid(fd)
        finally:
            os.close(fd)

    def wait_gone(self, holder: tuple[int, int, int | None] | None, timeout: float = 30.0) -> bool:
        """Wait until the server that held the name (``holder``, from :meth:`name_holder`) has
        let it go: its lock file removed or replaced, or its process gone (killed before it could
        remove the file). True when it has, False after ``timeout`` seconds. After a suspend, a
        destroy or a completed migration, vmmctl returns only then, so the next ``vmmrun`` of the
        same name does not find it still taken."""
        if holder is None:
            return True
        dev, ino, pid = holder
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = os.stat(self.lock_path)
            except FileNotFoundError:
                return True
            if (st.st_dev, st.st_ino) != (dev, ino) or (pid is not None and not _process_exists(pid)):
                return True
            now = self.name_holder()
            if now is not None and pid is not None and now[2] not in (None, pid):
                return True  # another server took the name (a live update's successor rewrites the lock file)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _connect(self) -> socket.socket:
        if not self.path.exists():
            raise ControlError(errno.ENOENT, f"no VM named '{self.vmname}' is running (no control socket at {self.path})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(
                errno.ECONNREFUSED,
                f"VM '{self.vmname}' is not running: its control socket {self.path} is stale (remove it, or start the VM again)",
            ) from None
        except PermissionError:
            sock.close()
            raise ControlError(errno.EACCES, f"permission denied on {self.path}: VM '{self.vmname}' belongs to another user") from None
        return sock

    def stream(self, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send a request; yield each progress dict; return (StopIteration value) the result."""
        with self._connect() as sock:
            send_message(sock, {"cmd": cmd, **args})
            while True:
                try:
                    reply = recv_message(sock)
                except ConnectionError:
                    raise ControlError(errno.EPIPE, f"VM '{self.vmname}' closed the control connection before answering {cmd!r}") from None
                except TimeoutError:
                    raise ControlError(errno.ETIMEDOUT, f"VM '{self.vmname}' did not answer {cmd!r} within {self.timeout} s") from None
                if "progress" in reply:
                    yield reply["progress"]
                    continue
                if reply.get("ok"):
                    return reply.get("result")
                raise ControlError(int(reply.get("errno") or errno.EIO), str(reply.get("error", "request failed")))

    def request(self, cmd: str, on_progress: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
        gen = self.stream(cmd, **args)
        while True:
            try:
                info = next(gen)
            except StopIteration as done:
                return done.value
            if on_progress is not None:
                on_progress(info)


def list_vms(directory: Path | None = None) -> list[tuple[str, bool]]:
    """(name, live) for every control socket in the run directory."""
    directory = directory or run_dir()
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.glob(f"*{SOCKET_SUFFIX}")):
        found.append((entry.name[: -len(SOCKET_SUFFIX)], _socket_is_live(entry)))
    return found
