"""The only module that talks SSH: connecting with strict host keys, running ``Command``s, streaming.

Everything runs over raw paramiko channels of a Fabric ``Connection`` (Fabric resolves
``~/.ssh/config``: HostName, Port, User, IdentityFile, ProxyJump). Invoke's ``run()`` is never used:
it decodes output as text and keeps all of it, which corrupts binary dumps and grows quadratically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import paramiko
from fabric import Config, Connection

from deploy.commands.base import Command, checksummed_stdin, checksummed_stdout, parse_checksum, script
from deploy.core.errors import HealthdeployError, HostKeyError, IntegrityError, RemoteCommandError
from deploy.core.secret import Secret, redact
from deploy.execute.executor import (DEFAULT_TIMEOUT, ConnectionLost, HeldCommand, Result, StreamResult,
                                     check_cancelled)

# Streaming tuning measured on this kind of machine (see docs/streaming.md): AES-GCM first,
# a 4 MiB window with 128 KiB packets, and recv() never smaller than the window (paramiko's
# BufferedPipe copies the rest of its buffer on every read).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
STREAM_WINDOW = 4 << 20
STREAM_PACKET = 128 << 10
STREAM_RECV = 4 << 20
# paramiko's client rekeys every 512 MiB; when the remote command ends during that rekey the
# transport can deadlock (paramiko #822) and truncate the stream. Client rekeying is switched off;
# the server still rekeys on its own limit, which is not affected.
NO_CLIENT_REKEY = 2**40

STDERR_KEEP = 64 << 10  # bytes of stderr kept per command (the tail, for error messages)

# Every command that changes something runs under this wrapper. It reports its process group, so at a
# deadline the whole group is killed on the host (not only our channel closed), and a watchdog kills the
# group when the channel's stdin closes: our process died or the connection dropped (a command that ends by
# itself ends its watchdog first, so a finished group is never signalled). The command reads /dev/null.
PGID_MARKER = "HEALTHDEPLOY-PGID "
WATCHED = r"""read -r _ _ _ _ pgid _ < /proc/$$/stat
printf 'HEALTHDEPLOY-PGID %s\n' "$pgid" >&2
exec 3<&0
( trap '' TERM; cat <&3 >/dev/null 2>&1; kill -s TERM -- "-$pgid" 2>/dev/null; sleep 3; kill -s KILL -- "-$pgid" 2>/dev/null ) >/dev/null 2>&1 &
w=$!
exec 3<&-
sh -c "$1" </dev/null
rc=$?
kill -s KILL "$w" 2>/dev/null
exit $rc
"""
KILL_GROUP = 'kill -s TERM -- "-$1" 2>/dev/null; sleep 2; kill -s KILL -- "-$1" 2>/dev/null; exit 0'


# A host that stops answering (network cut, frozen) is declared lost after about this many seconds, whether
# the connection is idle (TCP keepalive probes) or has data in flight (TCP_USER_TIMEOUT): a command does not
# wait for its own, much longer, deadline to find out.
DEAD_AFTER_S = 15


def _tuned_transport(sock, **kwargs) -> paramiko.Transport:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Without it Nagle and delayed ACKs add ~40 ms to small exchanges (OpenSSH sets it too): opening a
        # channel took 42 ms here, under 1 ms with it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3),
                              ("TCP_USER_TIMEOUT", DEAD_AFTER_S * 1000)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    available = tuple(options.ciphers)
    preferred = [c for c in PREFERRED_CIPHERS if c in available]
    options.ciphers = tuple(preferred + [c for c in available if c not in preferred])
    return transport


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint (what `ssh-keygen -lf` prints)."""
    return key.fingerprint  # paramiko >= 3.2: "SHA256:<base64 without padding>"


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Fabric 3 installs AutoAddPolicy, which trusts any key silently; we refuse and explain."""

    def __init__(self, alias: str, known_hosts: str):
        self.alias = alias
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"host key of {self.alias} ({hostname}) is not in {self.known_hosts}: "
            f"{key.get_name()} {fingerprint(key)}",
            f"verify it, then run `fab -H {self.alias} hosts.trust --fingerprint {fingerprint(key)}`",
        )


def fabric_config(ssh_config: str) -> Config:
    if ssh_config and Path(ssh_config).is_file():
        return Config(runtime_ssh_path=ssh_config)
    return Config()


def resolve(alias: str, ssh_config: str) -> tuple[str, int, str | None]:
    """(HostName, Port, User) of an alias, as OpenSSH and Fabric resolve it."""
    conn = Connection(alias, config=fabric_config(ssh_config))
    return conn.host, conn.port, conn.user


def _host_key_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


def fetch_host_key(alias: str, ssh_config: str, timeout: float = 10) -> tuple[str, paramiko.PKey]:
    """Read the key a host presents, without authenticating (for ``hosts.trust``)."""
    hostname, port, _ = resolve(alias, ssh_config)
    try:
        sock = socket.create_connection((hostname, port), timeout=timeout)
    except OSError as exc:
        raise HealthdeployError(f"cannot reach {alias} ({hostname}:{port}): {exc.strerror or exc}",
                                "check HostName/Port in your ssh config and that sshd runs") from None
    transport = _tuned_transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return _host_key_name(hostname, port), transport.get_remote_server_key()
    finally:
        transport.close()


def add_known_host(known_hosts: str, name: str, key: paramiko.PKey) -> None:
    """Append ``name keytype base64`` to known_hosts (created 0600 if missing), replacing an old entry."""
    path = Path(known_hosts)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in existing if not _line_names_host(line, name, key.get_name())]
    kept.append(f"{name} {key.get_name()} {key.get_base64()}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _line_names_host(line: str, name: str, key_type: str) -> bool:
    fields = line.split()
    if len(fields) < 3 or line.startswith("#"):
        return False
    return name in fields[0].split(",") and fields[1] == key_type


class RemoteHost:
    """An open SSH connection to one host, running ``Command``s over raw channels."""

    def __init__(self, alias: str, connection: Connection, secrets: tuple[Secret, ...] = ()):
        self.alias = alias
        self.connection = connection
        self.address = connection.host
        self.secrets = secrets
        self._streams: set[paramiko.Channel] = set()  # open streams, for abort_streams()

    # -- connecting ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, alias: str, ssh_config: str, known_hosts: str, timeout: int = 10,
                secrets: tuple[Secret, ...] = ()) -> "RemoteHost":
        conn = Connection(
            alias,
            config=fabric_config(ssh_config),
            connect_timeout=timeout,
            connect_kwargs={"transport_factory": _tuned_transport},
        )
        client = paramiko.SSHClient()
        if known_hosts and Path(known_hosts).is_file():
            client.load_host_keys(known_hosts)
        client.set_missing_host_key_policy(_RefuseUnknownHost(alias, known_hosts))
        conn.client = client
        try:
            conn.open()
        except HostKeyError:
            raise
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                f"host key of {alias} ({conn.host}) CHANGED: expected {fingerprint(exc.expected_key)}, "
                f"got {fingerprint(exc.key)}; refusing to connect",
                f"if the host was rebuilt, verify the new key out of band, then run `fab -H {alias} hosts.trust`",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise HealthdeployError(f"authentication to {alias} ({conn.user}@{conn.host}:{conn.port}) failed: {exc}",
                                    "check User/IdentityFile in your ssh config or your agent") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise HealthdeployError(f"cannot reach {alias} ({conn.host}:{conn.port}): {reason}",
                                    "check HostName/Port in your ssh config and that sshd runs") from None
        packetizer = conn.transport.packetizer
        for attr in ("REKEY_BYTES", "REKEY_PACKETS", "REKEY_BYTES_OVERFLOW_MAX", "REKEY_PACKETS_OVERFLOW_MAX"):
            setattr(packetizer, attr, NO_CLIENT_REKEY)
        conn.transport.set_keepalive(15)
        return cls(alias, conn, secrets)

    def close(self) -> None:
        self.connection.close()

    @contextlib.contextmanager
    def _stream_channel(self, command_line: str) -> Iterator[paramiko.Channel]:
        """A channel for a bulk stream, known to abort_streams() while it is open."""
        channel = self._open(command_line, window=STREAM_WINDOW)
        self._streams.add(channel)
        try:
            yield channel
        finally:
            self._streams.discard(channel)

    def abort_streams(self) -> None:
        """Close every stream still running (another one failed): each ends with an error at once, and
        the remote command loses its pipe, instead of finishing a transfer nobody will keep."""
        for channel in list(self._streams):
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def cipher(self) -> str:
        return self.connection.transport.remote_cipher

    def open_tcp(self, address: str, port: int, timeout: float = 10) -> paramiko.Channel:
        """A socket-like channel to ``address:port`` as seen from the host (SSH direct-tcpip, like ``ssh -L``).

        Used for the S3 API of the object store, published on the host's loopback only."""
        transport = self.connection.transport
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"connection to {self.alias} was lost", "run the task again")
        try:
            return transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                          window_size=STREAM_WINDOW, max_packet_size=STREAM_PACKET, timeout=timeout)
        except paramiko.ChannelException as exc:
            hint = ("the host's sshd refuses TCP forwarding: set `AllowTcpForwarding local` for this user"
                    if exc.code == 1 else f"is anything listening on {address}:{port} on the host?")
            raise HealthdeployError(f"{self.alias}: cannot open a tunnel to {address}:{port}: {exc.text}", hint) from None

    # -- running ---------------------------------------------------------------------------------
    def _open(self, command_line: str, window: int | None = None) -> paramiko.Channel:
        transport = self.connection.transport
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"connection to {self.alias} was lost", "run the task again")
        if window:
            channel = transport.open_session(window_size=window, max_packet_size=STREAM_PACKET)
        else:
            channel = transport.open_session()
        channel.exec_command(command_line)
        return channel

    def run(self, command: Command, check: bool = True, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None) -> Result:
        with self._connection_errors(command.description):
            return self._run(command, check, timeout, on_line)

    @contextlib.contextmanager
    def _connection_errors(self, what: str) -> Iterator[None]:
        """What the network does to a channel (reset, EOF, a closed transport) is one error: ConnectionLost."""
        try:
            yield
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if isinstance(exc, socket.timeout):
                raise
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ConnectionLost(f"connection to {self.alias} was lost during {what}: {reason}",
                                 "check the network and the host, then run the task again") from None

    def _run(self, command: Command, check: bool = True, timeout: float | None = None,
             on_line: Callable[[str], None] | None = None) -> Result:
        """Run to completion; stdout is kept whole (facts are small), stderr's tail is kept.

        ``on_line`` receives each output line (stdout and stderr) as it arrives, for progress. Every command
        has a deadline (its own, ``timeout``, or DEFAULT_TIMEOUT); at the deadline a command that changes
        something is killed on the host with its whole process group, and its ``on_timeout`` runs.
        """
        timeout = timeout or command.timeout or DEFAULT_TIMEOUT
        watched = not command.readonly and command.stdin is None
        line = script(WATCHED, command.render(), description=command.description).render() if watched else command.render()
        channel = self._open(line)
        if command.stdin is not None:
            channel.sendall(command.stdin)
        if not watched:
            channel.shutdown_write()
        deadline = time.monotonic() + timeout
        stdout = bytearray()
        stderr = bytearray()
        pending = b""
        pgid = ""
        marker = watched
        channel.settimeout(0.1)
        stdout_open = True
        try:
            while True:
                got_stderr = False
                while channel.recv_stderr_ready():
                    chunk = channel.recv_stderr(1 << 16)
                    if not chunk:
                        break
                    got_stderr = True
                    if marker:  # the wrapper's first line: its process group, not output
                        head = bytes(stderr) + chunk
                        if b"\n" not in head:
                            stderr[:] = head
                            continue
                        first, _, chunk = head.partition(b"\n")
                        pgid = first.decode(errors="replace").removeprefix(PGID_MARKER).strip()
                        stderr.clear()
                        marker = False
                    stderr += chunk
                    if len(stderr) > STDERR_KEEP:
                        del stderr[: len(stderr) - STDERR_KEEP]
                    if on_line:
                        pending = self._emit(pending + chunk, on_line)
                if stdout_open:
                    try:
                        chunk = channel.recv(1 << 20)
                    except socket.timeout:
                        chunk = None
                    if chunk:
                        stdout += chunk
                        if on_line:
                            pending = self._emit(pending + chunk, on_line)
                    elif chunk == b"":
                        stdout_open = False
                else:
                    # stdout is done; stderr ends with its own EOF (it may outlive the exit status).
                    try:
                        chunk = channel.recv_stderr(1 << 16)
                    except socket.timeout:
                        chunk = None
                    if chunk == b"" and not got_stderr:
                        break
                    if chunk:
                        stderr += chunk
                        del stderr[: max(0, len(stderr) - STDERR_KEEP)]
                        if on_line:
                            pending = self._emit(pending + chunk, on_line)
                if time.monotonic() > deadline:
                    self._kill_group(pgid, command)
                    raise HealthdeployError(
                        f"{command.description} on {self.alias} timed out after {timeout:.0f}s"
                        + (" and was killed on the host" if pgid else ""),
                        "the host may be overloaded or a server hangs; investigate, then run it again")
                if not self._active():
                    raise ConnectionLost(f"connection to {self.alias} was lost during {command.description}",
                                         "check the network and the host, then run the task again")
                check_cancelled()
        except BaseException:
            channel.close()
            raise
        if on_line and pending:
            on_line(redact(pending.decode("utf-8", "replace"), self.secrets))
        status = channel.recv_exit_status()
        channel.close()
        result = Result(status, bytes(stdout), bytes(stderr))
        if check and not result.ok:
            raise RemoteCommandError(f"{command.description} on {self.alias}", status,
                                     redact(result.err or result.text[-2000:], self.secrets))
        return result

    def _active(self) -> bool:
        transport = self.connection.transport
        return transport is not None and transport.is_active()

    def _kill_group(self, pgid: str, command: Command) -> None:
        """At a deadline: the command's process group dies on the host, then its own clean-up runs."""
        if not self._active():
            return
        for cleanup in ([script(KILL_GROUP, pgid, description="kill a timed-out command")] if pgid.isdigit() else []) + (
                [command.on_timeout] if command.on_timeout else []):
            try:
                channel = self._open(cleanup.render())
                channel.shutdown_write()
                channel.settimeout(30)
                while channel.recv(4096):
                    pass
                channel.close()
            except (OSError, paramiko.SSHException, socket.timeout, HealthdeployError):
                pass

    def hold(self, command: Command, timeout: float = 30) -> HeldCommand:
        """Start ``command`` and read its first line; it keeps running until the HeldCommand is closed (or our
        process dies: its stdin closes). If it ends on its own, everything it printed is returned."""
        with self._connection_errors(command.description):
            return self._hold(command, timeout)

    def _hold(self, command: Command, timeout: float) -> HeldCommand:
        channel = self._open(command.render())
        channel.settimeout(timeout)
        data = b""
        try:
            while b"\n" not in data:
                chunk = channel.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            channel.close()
            raise HealthdeployError(f"{command.description} on {self.alias}: no answer within {timeout:.0f}s",
                                    "the host may be overloaded; run it again") from None
        first, _, rest = data.partition(b"\n")
        if first.strip() != b"acquired":
            while True:  # the command ended: collect the rest of its output
                chunk = channel.recv(65536)
                if not chunk:
                    break
                rest += chunk
            channel.close()
            return HeldCommand(None, first.decode().strip(), rest.decode("utf-8", "replace"))
        channel.settimeout(None)
        return HeldCommand(channel.close, "acquired", "")

    def _emit(self, data: bytes, on_line: Callable[[str], None]) -> bytes:
        *lines, rest = data.split(b"\n")
        for line in lines:
            on_line(redact(line.decode("utf-8", "replace"), self.secrets))
        return rest

    def stream_to_file(self, command: Command, target: BinaryIO,
                       progress: Callable[[int], None] | None = None) -> StreamResult:
        """Copy the command's stdout byte for byte into ``target`` at constant memory.

        The remote side checksums the same bytes; exit status, byte count and SHA-256 are compared.
        """
        started = time.monotonic()
        with self._connection_errors(command.description), \
                self._stream_channel(checksummed_stdout(command).render()) as channel:
            return self._receive(command, channel, target, progress, started)

    def _receive(self, command: Command, channel: paramiko.Channel, target: BinaryIO,
                 progress: Callable[[int], None] | None, started: float) -> StreamResult:
        channel.shutdown_write()
        digest = hashlib.sha256()
        total = 0
        stderr = bytearray()
        channel.settimeout(0.5)
        last_report = 0.0
        while True:
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(1 << 16)
                if len(stderr) > STDERR_KEEP:
                    del stderr[: len(stderr) - STDERR_KEEP]
            try:
                data = channel.recv(STREAM_RECV)
            except socket.timeout:
                if not self._active():
                    raise ConnectionLost(f"connection to {self.alias} was lost during {command.description}",
                                         "check the network and the host, then run it again") from None
                check_cancelled()
                continue
            if not data:
                break
            target.write(data)
            digest.update(data)
            total += len(data)
            if progress and time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                progress(total)
        stderr += self._drain_stderr(channel)
        status = channel.recv_exit_status()
        channel.close()
        target.flush()
        if progress:
            progress(total)
        remote_sha, rest = parse_checksum(stderr.decode("utf-8", "replace"))
        result = StreamResult(total, digest.hexdigest(), remote_sha, status, time.monotonic() - started,
                              redact(rest, self.secrets))
        self._check_stream(command, result)
        return result

    def stream_from_file(self, command: Command, source: BinaryIO,
                         progress: Callable[[int], None] | None = None) -> StreamResult:
        """Feed ``source`` to the command's stdin at constant memory, checksummed on both ends."""
        started = time.monotonic()
        with self._connection_errors(command.description), \
                self._stream_channel(checksummed_stdin(command).render()) as channel:
            return self._send(command, channel, source, progress, started)

    def _send(self, command: Command, channel: paramiko.Channel, source: BinaryIO,
              progress: Callable[[int], None] | None, started: float) -> StreamResult:
        digest = hashlib.sha256()
        total = 0
        stderr = bytearray()
        while True:
            data = source.read(1 << 20)
            if not data:
                break
            try:
                channel.sendall(data)
            except OSError:
                # The remote command ended early (full disk, a failed restore): its stderr says why.
                stderr += self._drain_stderr(channel, discard_stdout=True)
                status = channel.recv_exit_status() if channel.exit_status_ready() else -1
                channel.close()
                raise RemoteCommandError(f"{command.description} on {self.alias}", status,
                                         redact(parse_checksum(stderr.decode("utf-8", "replace"))[1], self.secrets)
                                         or "the remote side closed the stream") from None
            digest.update(data)
            total += len(data)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(1 << 16)
                del stderr[: max(0, len(stderr) - STDERR_KEEP)]
            while channel.recv_ready():  # the command's stdout is not wanted, but must not stall it
                channel.recv(1 << 20)
            if progress:
                progress(total)
        channel.shutdown_write()
        stderr += self._drain_stderr(channel, discard_stdout=True)
        status = channel.recv_exit_status()
        channel.close()
        remote_sha, rest = parse_checksum(stderr.decode("utf-8", "replace"))
        result = StreamResult(total, digest.hexdigest(), remote_sha, status, time.monotonic() - started,
                              redact(rest, self.secrets))
        self._check_stream(command, result)
        return result

    @staticmethod
    def _drain_stderr(channel: paramiko.Channel, discard_stdout: bool = False) -> bytes:
        """Read stderr until its EOF. The exit status can arrive before the last stderr bytes
        (a process that outlives the command still holds stderr), so exit status alone is not the end."""
        out = bytearray()
        channel.settimeout(0.2)
        while True:
            if discard_stdout:
                while channel.recv_ready():
                    channel.recv(1 << 20)
            try:
                chunk = channel.recv_stderr(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                return bytes(out[-STDERR_KEEP:])
            out += chunk

    def _check_stream(self, command: Command, result: StreamResult) -> None:
        where = f"{command.description} on {self.alias}"
        if result.exit_status != 0:
            raise RemoteCommandError(where, result.exit_status, result.stderr)
        if result.remote_sha256 is None:
            raise IntegrityError(f"{where}: the remote checksum never arrived after {result.bytes} bytes",
                                 "the stream was cut; run it again")
        if result.remote_sha256 != result.sha256:
            raise IntegrityError(f"{where}: checksum mismatch after {result.bytes} bytes "
                                 f"(local {result.sha256[:12]}, remote {result.remote_sha256[:12]})",
                                 "the stream was corrupted or truncated; run it again")


def progress_printer(label: str, stream=None) -> Callable[[int], None] | None:
    """Bytes and rate on a terminal; nothing when output is not a terminal (scripts, CI)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None
    started = time.monotonic()

    def report(total: int) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        stream.write(f"\r{label}: {total / 1e6:,.1f} MB at {total / 1e6 / elapsed:,.1f} MB/s   ")
        stream.flush()

    return report
