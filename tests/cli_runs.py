"""``python SCRIPT ARGS`` for the tests, without paying for the imports of every run.

Importing an entry script's modules (Lightning pulls in torchmetrics, torchvision and torch._dynamo) takes
most of the seconds of a short run. :func:`run_script` hands each run to a fork server instead: a helper
process (this file run as a script) imports those modules once, and every run is a fresh fork of it that
becomes ``python SCRIPT ARGS``: its own ``sys.argv``, ``sys.path[0]``, working directory, environment,
stdin (``/dev/null``) and stdout/stderr file descriptors, the script run as ``__main__``, and the exit of a
Python process (the message of ``sys.exit("...")`` or an uncaught exception's traceback on stderr, exit
status 1, atexit handlers, flushed streams). Nothing one run changes (environment, Hydra's and Lightning's
global state, logging handlers, seeds) reaches another: each is its own process, as with
``subprocess.run``. Runs may overlap (:func:`start_script`, threads).

The one difference from a new interpreter: the modules were imported before the run, by the server. So
runs share a server only when their environments are equal but for :data:`READ_WHILE_RUNNING` (a server
per environment, at most :data:`MAX_SERVERS`; beyond that, a plain subprocess), and what a test checks of
a fresh interpreter itself (import-time warnings, ``python -m MODULE``) needs a plain subprocess.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: What the entry scripts import before their ``main()`` runs: imported once, by the server.
PRELOADED = (
    "hydra",
    "omegaconf",
    "lightning",
    "detr_lightning.config",
    "detr_lightning.sweep",
    "detr_lightning.training",
    "detr_lightning.evaluation",
    "detr_lightning.predict",
)
#: Environment variables that nothing reads while importing :data:`PRELOADED`: they may differ between
#: the runs of one server.
READ_WHILE_RUNNING = frozenset({"PYTEST_CURRENT_TEST", "WANDB_MODE"})
#: Servers a test process starts at most (one per environment); other runs start a plain subprocess.
MAX_SERVERS = 3


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of every ``python SCRIPT ARGS`` the tests run: offline (ours and the Hugging Face
    hub's, also for module-scoped fixtures, which run before the autouse fixture that sets them), no W&B,
    warnings off, one OpenMP thread; then ``extra``. One environment, so the runs share one server.

    One thread: the runs are seconds of tiny steps, and on 2 busy cores a second thread only spins against
    the other processes (a demo run: 10 s with one thread, 21-33 s with two, measured side by side)."""
    return {
        **os.environ,
        "DETR_LIGHTNING_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_script(
    script: str | Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``, as a fork of a preloaded server."""
    return start_script(script, args, cwd, env).wait(timeout)


def start_script(script: str | Path, args: list[str], cwd: Path, env: dict[str, str]) -> ScriptRun:
    """``python SCRIPT ARGS`` started (a fork of a preloaded server, or a subprocess), not awaited."""
    command = [sys.executable, str(script), *args]
    server = _server_for(env)
    if server is None:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return ScriptRun(command, process.pid, process=process)
    return server.start(command, cwd, env)


class ScriptRun:
    """A started ``python SCRIPT ARGS``: its ``pid``, and :meth:`wait` for its outcome."""

    def __init__(self, command: list[str], pid: int, process=None, server=None, run_id=None, streams=None):
        self.args, self.pid = command, pid
        self._process, self._server, self._id, self._streams = process, server, run_id, streams
        self._outcome: subprocess.CompletedProcess | None = None

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Its exit status, stdout and stderr, as ``subprocess.run(..., timeout=timeout)`` gives them: past
        ``timeout`` seconds it is killed and ``TimeoutExpired`` raised."""
        if self._outcome is None:
            self._outcome = self._wait(timeout)
        return self._outcome

    def _wait(self, timeout: float) -> subprocess.CompletedProcess:
        if self._process is not None:
            try:
                stdout, stderr = self._process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.communicate()
                raise
            return subprocess.CompletedProcess(self.args, self._process.returncode, stdout, stderr)
        finished = self._server.reply(self._id, "returncode", timeout)
        if finished is None:
            with contextlib.suppress(ProcessLookupError):  # unless it ended just now
                os.kill(self.pid, signal.SIGKILL)
            self._server.reply(self._id, "returncode", timeout=None)
            raise subprocess.TimeoutExpired(self.args, timeout, *map(_read, self._streams))
        return subprocess.CompletedProcess(self.args, finished["returncode"], *map(_read, self._streams))


def _read(path: Path) -> str:
    """A captured stream as ``subprocess.run(..., text=True)`` decodes it (universal newlines)."""
    text = path.read_bytes().decode()
    path.unlink()
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _ForkServer:
    """The client side of one server process, which imported :data:`PRELOADED` with environment ``env``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix="cli_runs-"))
        self.log = (self.folder / "server.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=REPO_ROOT,
            bufsize=0,
        )
        self.runs = 0
        self.replies: dict[tuple[int, str], dict] = {}
        self.received = b""
        self.reading = False
        self.lock = threading.Condition()

    def start(self, command: list[str], cwd: Path, env: dict[str, str]) -> ScriptRun:
        with self.lock:
            self.runs += 1
            run_id = self.runs
            streams = (self.folder / f"{run_id}.out", self.folder / f"{run_id}.err")
            request = {"id": run_id, "argv": command[1:], "cwd": str(cwd), "env": env}
            request.update(stdout=str(streams[0]), stderr=str(streams[1]))
            data = json.dumps(request).encode() + b"\n"
            while data:
                data = data[os.write(self.process.stdin.fileno(), data) :]
        pid = self.reply(run_id, "pid", timeout=None)["pid"]
        return ScriptRun(command, pid, server=self, run_id=run_id, streams=streams)

    def reply(self, run_id: int, kind: str, timeout: float | None) -> dict | None:
        """The server's ``kind`` reply about run ``run_id``, or None after ``timeout`` seconds without it.

        One waiting thread at a time reads the server's replies, for all of them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while (run_id, kind) not in self.replies:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if self.reading:
                    self.lock.wait(left)
                    continue
                self.reading = True
                self.lock.release()
                try:
                    lines = self._read_lines(left)
                finally:
                    self.lock.acquire()
                    self.reading = False
                    self.lock.notify_all()
                for line in lines:
                    message = json.loads(line)
                    self.replies[message.pop("id"), next(iter(message))] = message
            return self.replies.pop((run_id, kind))

    def _read_lines(self, timeout: float | None) -> list[bytes]:
        """The complete reply lines that arrive within ``timeout`` seconds (none if nothing arrives)."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            self.log.flush()
            log = (self.folder / "server.log").read_text()
            raise RuntimeError(f"the fork server of cli_runs stopped:\n{log[-3000:]}")
        *lines, self.received = (self.received + chunk).split(b"\n")
        return lines

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


#: The servers of this process by the environment they imported with (less READ_WHILE_RUNNING).
_SERVERS: dict[frozenset, _ForkServer | None] = {}
_SERVERS_LOCK = threading.Lock()


def _server_for(env: dict[str, str]) -> _ForkServer | None:
    key = frozenset((name, value) for name, value in env.items() if name not in READ_WHILE_RUNNING)
    with _SERVERS_LOCK:
        if key not in _SERVERS:
            if len(_SERVERS) >= MAX_SERVERS:
                return None
            _SERVERS[key] = server = _ForkServer(dict(env))
            atexit.register(server.close)
        return _SERVERS[key]


# ------------------------------------------------------------------------------------- the server process


def _serve() -> dict | None:
    """Fork a run for each request (one JSON line on stdin); reply ``{"id", "pid"}`` on stdout at once
    and ``{"id", "returncode"}`` when it ends. Runs may overlap.

    Returns the request in a forked run (which then becomes it), None when stdin closes."""
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the server's own prints never mix with the replies
    os.close(devnull)
    woken, wake = os.pipe()  # a byte on each SIGCHLD
    os.set_blocking(woken, False)
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    running: dict[int, int] = {}  # pid -> run id
    received = b""
    while True:
        ready, _, _ = select.select([requests, woken], [], [], 1.0)
        if woken in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(woken, 4096)
        while running:  # reap every run that has ended
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            message = {"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}
            os.write(replies, json.dumps(message).encode() + b"\n")
        if requests not in ready:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:
            return None
        *lines, received = (received + chunk).split(b"\n")
        for line in lines:
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (requests, replies, woken, wake):
                    os.close(fd)
                return request
            running[pid] = request["id"]
            os.write(replies, json.dumps({"id": request["id"], "pid": pid}).encode() + b"\n")


def _become(request: dict) -> None:
    """Make this forked process ``python ARGV`` started in ``cwd`` with ``env`` and the captured streams."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        captured = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(captured, fd)
        os.close(captured)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))


def main() -> None:
    sys.path[0] = str(REPO_ROOT)  # not tests/: the preloaded modules resolve as for the entry scripts
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    request = _serve()
    if request is not None:  # a forked run: it ends as `python SCRIPT` ends
        _become(request)
        _run_as_main(sys.argv[0])


def _run_as_main(script: str) -> None:
    """Run ``script`` as ``__main__``; an exception it does not catch is reported as for ``python SCRIPT``
    (its traceback from the script's first frame on) and exits with status 1. ``SystemExit`` and
    ``KeyboardInterrupt`` end the process as they would there."""
    try:
        runpy.run_path(script, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as error:
        frames = error.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename != script:
            frames = frames.tb_next
        error.with_traceback(frames or error.__traceback__)
        sys.excepthook(type(error), error, error.__traceback__)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
