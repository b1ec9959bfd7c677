"""The real CLI in processes of their own, forked from an interpreter that has already imported the stack.

Every end-to-end test starts ``python -m consortium.cli ...`` as a process; before such a process does
anything it spends about 3.5 s of CPU importing torch, dp-accounting (scipy) and the run stack, and the
processes the tests start took four fifths of the suite's CPU (measured per test, 2026-12-06). Here one
server process per test worker imports the heavy modules once (never the CLI itself, and it runs
nothing) and forks a child for each launch. The child is a real process of its own: its own pid, the
stdin, stdout and stderr it is given, its working directory and environment, its exit status and the
signals sent to it; it runs the CLI's ``__main__`` module as ``python -m`` does. What it shares with the
server is only the import work, copied on write.

``ForkedPopen`` is a ``subprocess.Popen`` whose child comes from the server, so ``communicate``,
``wait``, ``poll``, ``kill`` and ``send_signal`` work as on any ``Popen``. The README's commands
(``tests/test_deploy_readme.py``) and the console-script tests still start a fresh interpreter, so the
cold start stays covered.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "consortium.cli"]

# What every CLI process would import first: imported once, in the server. The CLI's own modules
# (typer, rich and their consoles, which read the environment when built) are imported fresh in each child.
PRELOAD = (
    "torch", "scipy.signal", "dp_accounting", "sqlalchemy.orm", "fastapi", "uvicorn", "httpx", "safetensors.numpy",
    "consortium.config", "consortium.run.simulation", "consortium.run.orchestrator", "consortium.run.lifecycle",
    "consortium.deploy.serve", "consortium.deploy.join", "consortium.deploy.agent", "consortium.deploy.provision",
    "consortium.deploy.local", "consortium.audit.verify", "consortium.redteam.report",
)


# -- the server ---------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Import ``PRELOAD``, then fork a child per request on the socket at ``path`` until stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)  # the test worker holds the other end: gone, we go
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=0.02):
            if key.fileobj is sys.stdin:
                return
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _child(json.loads(data), fds)  # never returns
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"status": status}).encode())
                except OSError:
                    pass  # the test went away first
                conn.close()


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become ``python -m consortium.cli ARGS`` with the given streams, folder and environment."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.closerange(3, 256)  # nothing of the server's survives but what it imported
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = sys.__stdout__ = _stream(1, unbuffered, "strict")
        sys.stderr = sys.__stderr__ = _stream(2, True, "backslashreplace")
        sys.argv = ["-m", *request["args"]]
        code = _run_main()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as exc:  # raised by the stream set-up above, not by the CLI
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child never returns into the server's loop
        code = 1
    finally:
        os._exit(code)


def _stream(fd: int, unbuffered: bool, errors: str) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    if unbuffered:  # as python -u and PYTHONUNBUFFERED: every write goes straight out
        return io.TextIOWrapper(raw, encoding="utf-8", errors=errors, write_through=True)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors=errors, line_buffering=fd == 2)


def _run_main() -> int:
    """``python -m consortium.cli``'s own ending: the exit code of SystemExit, a traceback and 1, or a signal."""
    import runpy

    try:
        runpy.run_module("consortium.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:  # noqa: BLE001 - the interpreter's own report of an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish()
    atexit._run_exitfuncs()  # type: ignore[attr-defined]
    return code


def _finish() -> None:
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does: wait for non-daemon threads


# -- the client ---------------------------------------------------------------------------------


class _Server:
    """This test worker's fork server, started on first use and stopped with the worker."""

    _lock = threading.Lock()
    _instance: _Server | None = None

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="consortium-forkserver-")
        self.path = os.path.join(self.folder, "s")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                   f"import forkserver; forkserver.serve({self.path!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
        )
        ready = self.proc.stdout.readline()  # type: ignore[union-attr]
        if ready.strip() != b"ready":
            raise RuntimeError(f"the test fork server did not start (exit {self.proc.wait()})")
        atexit.register(self.stop)

    @classmethod
    def get(cls) -> _Server:
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = cls()
            return cls._instance

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


class ForkedPopen(subprocess.Popen):
    """``subprocess.Popen`` of ``python -m consortium.cli ARGS``, its child forked by the fork server.

    Takes ``Popen``'s arguments (``args`` must start with ``CLI``); ``cwd`` and ``env`` as there
    (default: this process's). Options that only an exec'ed child could honour are refused.
    """

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,  # type: ignore[override]
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, *rest) -> None:
        args = [os.fsdecode(a) for a in args]
        if args[: len(CLI)] != CLI or shell or executable or preexec_fn or pass_fds:
            raise ValueError(f"the fork server runs `{' '.join(CLI)} ARGS` only, not {args}")
        streams = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        request = {
            "args": args[len(CLI):],
            "cwd": os.fsdecode(cwd) if cwd is not None else os.getcwd(),
            "env": {os.fsdecode(k): os.fsdecode(v) for k, v in (os.environ if env is None else env).items()},
        }
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._conn.connect(_Server.get().path)
            socket.send_fds(self._conn, [json.dumps(request).encode()], streams)
            self.pid = json.loads(self._conn.recv(1 << 16))["pid"]
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self._child_created = True

    def _status(self, timeout: float | None) -> bool:
        """Take the child's exit status from the server if it comes within ``timeout``; True once known."""
        if self.returncode is not None:
            return True
        self._conn.settimeout(timeout)
        try:
            reply = self._conn.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            return False
        self.returncode = os.waitstatus_to_exitcode(json.loads(reply)["status"]) if reply else -signal.SIGKILL
        self._conn.close()
        return True

    def _internal_poll(self, _deadstate=None, _waitpid=None, _WNOHANG=None, _ECHILD=None):  # type: ignore[override]
        self._status(0.0)
        return self.returncode

    def _wait(self, timeout):  # type: ignore[override]
        if timeout is None:
            self._status(None)
            return self.returncode
        if not self._status(max(0.0, timeout)):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def popen(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``; forked from the server when ``args`` is the CLI's."""
    if [os.fsdecode(a) for a in args[: len(CLI)]] == CLI:
        return ForkedPopen(args, **kwargs)
    return subprocess.Popen(args, **kwargs)


def run(args: list[str], *, input: str | bytes | None = None, timeout: float | None = None, check: bool = False,
        capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run``'s contract, with its process started by ``popen``."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(args, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m consortium.cli ARGS`` to its end (``run``'s keywords)."""
    return run([*CLI, *map(str, args)], **kwargs)
