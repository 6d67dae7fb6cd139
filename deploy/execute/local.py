"""The only module that runs commands on the operator's machine (sandbox set-up, image builds, bench)."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from deploy.core.errors import HealthdeployError, RemoteCommandError
from deploy.core.secret import redact
from deploy.execute.executor import DEFAULT_TIMEOUT, Result, StreamResult, cancelled, check_cancelled


@dataclass(frozen=True)
class LocalResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_local(argv: list[str] | tuple[str, ...], check: bool = True, input: bytes | None = None,
              capture: bool = True, timeout: float | None = None, cwd: str | None = None,
              env: dict[str, str] | None = None) -> LocalResult:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=capture, timeout=timeout, cwd=cwd, env=env)
    except FileNotFoundError:
        raise HealthdeployError(f"{argv[0]} is not installed", "run `inv sandbox.install` or install it") from None
    out = proc.stdout.decode("utf-8", "replace") if capture else ""
    err = proc.stderr.decode("utf-8", "replace") if capture else ""
    if check and proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise HealthdeployError(f"`{shlex.join(argv)[:200]}` failed with exit status {proc.returncode}"
                                + (": " + " | ".join(tail) if tail else ""))
    return LocalResult(proc.returncode, out, err)


def spawn_local(argv: list[str] | tuple[str, ...], log_path: str, env: dict[str, str] | None = None,
                cwd: str | None = None) -> int:
    """Start a background daemon in its own session (Ctrl-C of the caller does not reach it), stdin from
    /dev/null, stdout and stderr appended to ``log_path``. Returns its pid; the caller tracks it by pid."""
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, env=env, cwd=cwd)
        except FileNotFoundError:
            raise HealthdeployError(f"{argv[0]} is not installed", "run `inv sandbox.install` or install it") from None
    return proc.pid


def pipe_local(producer: list[str] | tuple[str, ...], consumers: list[list[str]], timeout: float | None = None,
               chunk: int = 1 << 20) -> list[LocalResult]:
    """``producer | consumer`` for one consumer (a kernel pipe), or the producer's stdout fed to every
    consumer's stdin (a tee, one read of the producer for all). Raises when any side fails."""
    import tempfile

    def read(f) -> str:
        f.seek(0)
        return f.read().decode("utf-8", "replace")

    outs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in consumers]
    perr = tempfile.TemporaryFile()
    try:
        try:
            prod = subprocess.Popen(list(producer), stdout=subprocess.PIPE, stderr=perr)
        except FileNotFoundError:
            raise HealthdeployError(f"{producer[0]} is not installed", "run `inv sandbox.install`") from None
        procs = []
        try:
            for argv, (out, err) in zip(consumers, outs):
                stdin = prod.stdout if len(consumers) == 1 else subprocess.PIPE
                procs.append(subprocess.Popen(list(argv), stdin=stdin, stdout=out, stderr=err))
        except FileNotFoundError as exc:
            prod.kill()
            for p in procs:
                p.kill()
            raise HealthdeployError(f"{exc.filename} is not installed", "run `inv sandbox.install`") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(consumers) == 1:
            prod.stdout.close()  # the consumer holds the read end; a dead consumer gives the producer EPIPE
        else:
            alive = list(procs)
            while alive:
                data = prod.stdout.read(chunk)
                if not data:
                    break
                for p in list(alive):
                    try:
                        p.stdin.write(data)
                    except BrokenPipeError:
                        alive.remove(p)
                if deadline and time.monotonic() > deadline:
                    break
            prod.stdout.close()
            for p in procs:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        results = []
        for p, (out, err) in zip(procs, outs):
            try:
                p.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            results.append(LocalResult(p.returncode, read(out), read(err)))
        try:
            prod.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            prod.kill()
            prod.wait()
        if prod.returncode != 0:
            tail = read(perr).strip().splitlines()[-3:]
            raise HealthdeployError(f"`{shlex.join(producer)[:200]}` failed with exit status {prod.returncode}"
                                    + (": " + " | ".join(tail) if tail else ""))
        for argv, result in zip(consumers, results):
            if not result.ok:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                raise HealthdeployError(f"`{shlex.join(argv)[:200]}` failed with exit status {result.returncode}"
                                        + (": " + " | ".join(tail) if tail else ""))
        return results
    finally:
        perr.close()
        for out, err in outs:
            out.close()
            err.close()


class LocalHost:
    """The operator's machine as an executor (``Executor`` protocol): runs ``Command``s as argv, without a shell
    (a pipeline goes through ``bash -c`` of its one rendering), in their own process group, with the same
    deadlines, cancellation and errors as ``RemoteHost``. What ``BUILD_ON=operator`` builds with."""

    alias = "operator"
    address = "127.0.0.1"

    def __init__(self, secrets: tuple = ()):
        self.secrets = secrets

    @staticmethod
    def argv_of(command) -> list[str]:
        parts = command.parts
        if len(parts) == 1 and isinstance(parts[0], tuple):
            return list(parts[0])
        return ["bash", "-c", command.render()]

    def run(self, command, check: bool = True, timeout: float | None = None, on_line=None):
        return self._run(command, check, timeout, on_line, command.stdin)

    def stream_from_file(self, command, source, progress=None):
        """Feed ``source`` to the command's stdin (e.g. ``tar -x`` of a build context), checksummed."""
        started = time.monotonic()
        data = source.read()
        self._run(command, True, None, None, data)
        digest = hashlib.sha256(data).hexdigest()
        if progress:
            progress(len(data))
        return StreamResult(len(data), digest, digest, 0, time.monotonic() - started, "")

    def _run(self, command, check, timeout, on_line, stdin: bytes | None):
        timeout = timeout or command.timeout or DEFAULT_TIMEOUT
        argv = self.argv_of(command)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise HealthdeployError(f"{argv[0]} is not installed on this machine",
                                    f"install it, or set BUILD_ON=host ({command.description})") from None
        out, err = bytearray(), bytearray()

        def pump(pipe, sink: bytearray) -> None:
            pending = b""
            for chunk in iter(lambda: pipe.read1(1 << 16), b""):
                sink += chunk
                if on_line:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        on_line(redact(line.decode("utf-8", "replace").rstrip("\r"), self.secrets))
            if on_line and pending:
                on_line(redact(pending.decode("utf-8", "replace"), self.secrets))

        readers = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
        for reader in readers:
            reader.start()
        if stdin is not None:
            try:
                proc.stdin.write(stdin)
            except BrokenPipeError:
                pass
            finally:
                proc.stdin.close()
        deadline = time.monotonic() + timeout

        def kill_group() -> None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

        while proc.poll() is None:
            if cancelled():
                kill_group()
                check_cancelled()
            if time.monotonic() > deadline:
                kill_group()
                raise HealthdeployError(f"{command.description} on this machine did not finish within {timeout:.0f}s",
                                        "it was stopped; run the deploy again")
            time.sleep(0.05)
        for reader in readers:
            reader.join(timeout=5)
        result = Result(proc.returncode, bytes(out), bytes(err[-(64 << 10):]))
        if check and not result.ok:
            raise RemoteCommandError(f"{command.description} on this machine", result.exit_status,
                                     redact(result.err, self.secrets))
        return result

    def open_tcp(self, address: str, port: int, timeout: float = 10):
        return socket.create_connection((address, port), timeout=timeout)

    def abort_streams(self) -> None:
        pass

    def close(self) -> None:
        pass
