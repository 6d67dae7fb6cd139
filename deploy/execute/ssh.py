"""The only module that talks SSH: connecting with strict host keys, running ``Command``s, streaming.

Everything runs over raw paramiko channels of a Fabric ``Connection`` (Fabric resolves
``~/.ssh/config``: HostName, Port, User, IdentityFile, ProxyJump). Invoke's ``run()`` is never used:
it decodes output as text and keeps all of it, which corrupts binary dumps and grows quadratically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import paramiko
from fabric import Config, Connection

from deploy.commands.base import Command, checksummed_stdin, checksummed_stdout, parse_checksum, script
from deploy.core.errors import HealthdeployError, HostKeyError, IntegrityError, RemoteCommandError, UsageError
from deploy.core.secret import Secret, redact
from deploy.execute.executor import (DEFAULT_TIMEOUT, ConnectionLost, HeldCommand, Result, StreamResult, Tunnel,
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
# Structured stderr lines (row counts, InfluxDB counts and cut-off: ``structured=`` prefixes) are all kept,
# whatever else the command prints; past this cap the command fails clearly instead of losing some.
STRUCTURED_KEEP = 64 << 20


class StderrKeeper:
    """Every stderr line that starts with one of ``prefixes``, in order, plus the tail of everything else.

    A stream's tail alone is not enough: a dump that reports the row counts of 2,000 tables first, then its
    tool's messages, would lose the first counts."""

    def __init__(self, prefixes: tuple[str, ...] = (), keep: int = STDERR_KEEP, cap: int = STRUCTURED_KEEP,
                 what: str = "the command"):
        self.prefixes = tuple(p.encode() for p in prefixes)
        self.keep, self.cap, self.what = keep, cap, what
        self.structured: list[bytes] = []
        self.structured_bytes = 0
        self.tail = bytearray()
        self.pending = bytearray()

    def feed(self, data: bytes) -> None:
        if not self.prefixes:
            self.tail += data
            del self.tail[: max(0, len(self.tail) - self.keep)]
            return
        self.pending += data
        while True:
            index = self.pending.find(b"\n")
            if index < 0:
                break
            self._line(bytes(self.pending[: index + 1]))
            del self.pending[: index + 1]
        head = bytes(self.pending[:64])
        if len(self.pending) > self.keep and not any(p.startswith(head[:len(p)]) or head.startswith(p)
                                                     for p in self.prefixes):
            self._line(bytes(self.pending))  # a long unstructured line: it goes to the tail
            self.pending.clear()
        if self.structured_bytes + len(self.pending) > self.cap:
            raise IntegrityError(f"{self.what} printed more than {self.cap >> 20} MiB of structured lines "
                                 "(row counts, InfluxDB counts)",
                                 "report it: the set would not record every count; raise STRUCTURED_KEEP")

    def _line(self, line: bytes) -> None:
        if self.prefixes and line.startswith(self.prefixes):
            self.structured.append(line if line.endswith(b"\n") else line + b"\n")
            self.structured_bytes += len(line)
            if self.structured_bytes > self.cap:
                raise IntegrityError(f"{self.what} printed more than {self.cap >> 20} MiB of structured lines "
                                     "(row counts, InfluxDB counts)",
                                     "report it: the set would not record every count; raise STRUCTURED_KEEP")
            return
        self.tail += line
        del self.tail[: max(0, len(self.tail) - self.keep)]

    def finish(self) -> bytes:
        """The structured lines, then the tail of the rest."""
        if self.pending:
            self._line(bytes(self.pending))
            self.pending.clear()
        return b"".join(self.structured) + bytes(self.tail)

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


def _heartbeat(channel: paramiko.Channel, stop: threading.Event, every_s: float) -> None:
    """One byte on a held command's stdin every ``every_s``: the host's lease (commands.presence) sees us."""
    while not stop.wait(every_s):
        try:
            if channel.closed or channel.send(b".") == 0:
                return
        except (OSError, EOFError, paramiko.SSHException):
            return  # the connection is gone; the command that uses it next reports that


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint (what `ssh-keygen -lf` prints)."""
    return key.fingerprint  # paramiko >= 3.2: "SHA256:<base64 without padding>"


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Fabric 3 installs AutoAddPolicy, which trusts any key silently; we refuse and explain."""

    def __init__(self, label: str, known_hosts: str, trust_alias: str):
        self.label = label
        self.known_hosts = known_hosts
        self.trust_alias = trust_alias

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"host key of {self.label} ({hostname}) is not in {self.known_hosts}: "
            f"{key.get_name()} {fingerprint(key)}",
            f"verify it, then run `fab -H {self.trust_alias} hosts.trust --fingerprint {fingerprint(key)}`"
            if self.label == self.trust_alias else
            f"verify it, then run `fab -H {self.trust_alias} hosts.trust`, which shows and records the key of each hop",
        )


class _StrictClient(paramiko.SSHClient):
    """An SSHClient for one hop of a connection (a jump host or the final host): known_hosts only, unknown keys
    refused, a changed key refused as CHANGED, every failure naming the hop."""

    def __init__(self, label: str, known_hosts: str, trust_alias: str):
        super().__init__()
        self.label = label
        self.trust_alias = trust_alias
        if known_hosts and Path(known_hosts).is_file():
            self.load_host_keys(known_hosts)
        self.set_missing_host_key_policy(_RefuseUnknownHost(label, known_hosts, trust_alias))

    def connect(self, hostname, port=22, *args, **kwargs):
        try:
            return super().connect(hostname, port, *args, **kwargs)
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                f"host key of {self.label} ({hostname}) CHANGED: expected "
                f"{fingerprint(exc.expected_key)}, got {fingerprint(exc.key)}; refusing to connect",
                f"if the host was rebuilt, verify the new key out of band, then run `fab -H {self.trust_alias} hosts.trust`",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise HealthdeployError(f"authentication to {self.label} ({kwargs.get('username')}@{hostname}:{port}) "
                                    f"failed: {exc}", "check User/IdentityFile in your ssh config or your agent") from None


def fabric_config(ssh_config: str) -> Config:
    if ssh_config and Path(ssh_config).is_file():
        return Config(runtime_ssh_path=ssh_config)
    return Config()


def resolve(alias: str, ssh_config: str) -> tuple[str, int, str | None]:
    """(HostName, Port, User) of an alias, as OpenSSH and Fabric resolve it."""
    conn = Connection(alias, config=fabric_config(ssh_config), gateway=False)
    return conn.host, conn.port, conn.user


def _host_key_name(hostname: str, port: int) -> str:
    return hostname if int(port) == 22 else f"[{hostname}]:{port}"


MAX_HOPS = 8


class HopConnection(Connection):
    """A Fabric Connection that knows how to name itself in messages (a jump host or the final host)."""

    hd_label = ""  # a real attribute: Fabric's Connection turns unknown attribute writes into config writes


def connection_for(alias: str, ssh_config: str, known_hosts: str, timeout: float = 10, trust_alias: str = "",
                   label: str = "", gateway: "Connection | None" = None, depth: int = 0) -> Connection:
    """A Fabric ``Connection`` whose every hop verifies its host key against ``known_hosts`` like the final host.

    Fabric resolves ~/.ssh/config (HostName, Port, User, IdentityFile) but builds ProxyJump gateways with
    AutoAddPolicy (any key accepted) and, for several jump hosts, in reverse order. The chain is built here
    instead, in OpenSSH's order: ``ProxyJump j1,j2`` reaches j1 (through j1's own ProxyJump/ProxyCommand, if
    any), then j2 through j1, then the host through j2. A ProxyCommand stays the operator's program; the host
    reached through it is verified here."""
    if depth > MAX_HOPS:
        raise HealthdeployError(f"more than {MAX_HOPS} ProxyJump hops on the way to {trust_alias or alias}",
                                "check ProxyJump in your ssh config for a loop")
    trust_alias = trust_alias or alias
    conn = HopConnection(alias, config=fabric_config(ssh_config), gateway=False, connect_timeout=timeout,
                         connect_kwargs={"transport_factory": _tuned_transport})
    if gateway is not None:
        conn.gateway = gateway
    else:
        jump = (conn.ssh_config.get("proxyjump") or "").strip()
        command = (conn.ssh_config.get("proxycommand") or "").strip()
        hops = [h.strip() for h in jump.split(",") if h.strip()] if jump.lower() != "none" else []
        if hops and Connection(hops[0], config=fabric_config(ssh_config), gateway=False).host == conn.host:
            hops = []  # a wildcard Host block that names this host as its own jump host (as Fabric guards too)
        previous = None
        for index, hop in enumerate(hops):
            previous = connection_for(hop, ssh_config, known_hosts, timeout, trust_alias,
                                      f"{hop} (jump host {index + 1} of {len(hops)} to {trust_alias})",
                                      gateway=previous, depth=depth + 1)
        if previous is not None:
            conn.gateway = previous
        elif command and command.lower() != "none":
            conn.gateway = command
    conn.client = _StrictClient(label or alias, known_hosts, trust_alias)
    conn.hd_label = label or alias
    return conn


def hops_of(conn: Connection) -> list[Connection]:
    """The connections on the way to ``conn``, in the order they are made, ending with ``conn``."""
    chain = [conn]
    while isinstance(chain[-1].gateway, Connection):
        chain.append(chain[-1].gateway)
    return list(reversed(chain))


def close_chain(conn: Connection) -> None:
    for hop in reversed(hops_of(conn)):
        try:
            hop.close()
        except Exception:  # closing is best effort
            pass


def fetch_key_of(conn: Connection, timeout: float = 10) -> tuple[str, paramiko.PKey]:
    """The key ``conn``'s host presents, reached the way a connection would reach it: through its (verified,
    authenticated) jump hosts or its ProxyCommand, never by a direct connection to its HostName. Without
    authenticating to it (for ``hosts.trust``)."""
    name = _host_key_name(conn.host, conn.port)
    label = getattr(conn, "hd_label", "") or conn.host
    try:
        if conn.gateway:
            sock = conn.open_gateway()
        else:
            sock = socket.create_connection((conn.host, int(conn.port)), timeout=timeout)
    except HealthdeployError:
        raise
    except (OSError, paramiko.SSHException, EOFError) as exc:
        raise HealthdeployError(f"cannot reach {label} ({conn.host}:{conn.port}): {getattr(exc, 'strerror', None) or exc}",
                                "check HostName/Port/ProxyJump in your ssh config and that sshd runs") from None
    transport = _tuned_transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return name, transport.get_remote_server_key()
    except (OSError, paramiko.SSHException, EOFError) as exc:
        raise HealthdeployError(f"cannot read the host key of {label} ({name}): {exc}",
                                "check that sshd runs there") from None
    finally:
        transport.close()


def fetch_host_key(alias: str, ssh_config: str, timeout: float = 10) -> tuple[str, paramiko.PKey]:
    """Read the key a host presents, without authenticating (through its jump hosts, which must be trusted)."""
    return fetch_key_of(connection_for(alias, ssh_config, "", timeout), timeout)


def known_key(conn: Connection, name: str, key_type: str) -> paramiko.PKey | None:
    """The key known_hosts holds for ``name`` (hashed entries too), preferring the same type."""
    entry = conn.client.get_host_keys().lookup(name)
    if not entry:
        return None
    return entry.get(key_type) or next(iter(entry.values()), None)


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


def _check_before_connecting(alias: str, conn: Connection, ssh_config: str) -> None:
    """What the ssh config gets wrong, said as such before any packet is sent (not as "cannot reach ...")."""
    where = ssh_config if ssh_config and Path(ssh_config).is_file() else "~/.ssh/config"
    files = conn.connect_kwargs.get("key_filename") or []
    for name in [files] if isinstance(files, str) else files:
        path = Path(name).expanduser()
        fix = f"fix IdentityFile of Host {alias} in {where}"
        if not path.exists():
            raise UsageError(f"IdentityFile {name} of {alias} does not exist", fix)
        try:
            paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            pass  # a passphrase-protected key: the agent or a passphrase may still open it
        except OSError as exc:
            raise UsageError(f"IdentityFile {name} of {alias} cannot be read: {exc.strerror or exc}", fix) from None
        except (paramiko.SSHException, ValueError):
            raise UsageError(f"IdentityFile {name} of {alias} is not a private key",
                             f"point it at the private key (not the .pub): {fix}") from None
    if not conn.gateway:  # through ProxyJump/ProxyCommand the name is resolved on the far side
        try:
            socket.getaddrinfo(conn.host, conn.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            what = (f"{alias} is neither a Host in {where} nor a name DNS knows" if conn.host == alias
                    else f"HostName {conn.host} of {alias} does not resolve")
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise UsageError(f"cannot reach {alias}: {what} ({exc.strerror})",
                                 f"fix HOSTS, or add `Host {alias}` with its HostName to {where}") from None
            raise HealthdeployError(f"cannot reach {alias}: resolving {conn.host} failed ({exc.strerror})",
                                    "check DNS on this machine, then run it again") from None


def identity_of(transport: paramiko.Transport | None) -> str:
    """SHA256 fingerprint of the key the host accepted for our login (what the host can vouch for: it checked
    a signature by it), or "" when it was not a public key. paramiko keeps the key of the publickey attempt
    that succeeded (the legacy auth flow stops at the first success)."""
    handler = getattr(transport, "auth_handler", None)
    if handler is None or not handler.is_authenticated() or handler.auth_method != "publickey" or handler.private_key is None:
        return ""
    return fingerprint(handler.private_key)


class RemoteHost:
    """An open SSH connection to one host, running ``Command``s over raw channels."""

    def __init__(self, alias: str, connection: Connection, secrets: tuple[Secret, ...] = ()):
        self.alias = alias
        self.connection = connection
        self.address = connection.host
        self.secrets = secrets
        # SHA256 fingerprint of the key that authenticated us (set by connect): the audit's `key`.
        self.identity = ""
        self._streams: set[paramiko.Channel] = set()  # open streams, for abort_streams()

    # -- connecting ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, alias: str, ssh_config: str, known_hosts: str, timeout: int = 10,
                secrets: tuple[Secret, ...] = ()) -> "RemoteHost":
        conn = connection_for(alias, ssh_config, known_hosts, timeout)
        _check_before_connecting(alias, conn, ssh_config)
        try:
            conn.open()
        except HealthdeployError:  # host keys and authentication, of any hop, already explained
            close_chain(conn)
            raise
        except paramiko.AuthenticationException as exc:
            close_chain(conn)
            raise HealthdeployError(f"authentication to {alias} ({conn.user}@{conn.host}:{conn.port}) failed: {exc}",
                                    "check User/IdentityFile in your ssh config or your agent") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            close_chain(conn)
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            via = f" through {', '.join(h.hd_label.split(' ')[0] for h in hops_of(conn)[:-1])}" if isinstance(conn.gateway, Connection) else ""
            raise HealthdeployError(f"cannot reach {alias} ({conn.host}:{conn.port}){via}: {reason}",
                                    "check HostName/Port/ProxyJump in your ssh config and that sshd runs") from None
        packetizer = conn.transport.packetizer
        for attr in ("REKEY_BYTES", "REKEY_PACKETS", "REKEY_BYTES_OVERFLOW_MAX", "REKEY_PACKETS_OVERFLOW_MAX"):
            setattr(packetizer, attr, NO_CLIENT_REKEY)
        conn.transport.set_keepalive(15)
        host = cls(alias, conn, secrets)
        host.identity = identity_of(conn.transport)
        return host

    def close(self) -> None:
        close_chain(self.connection)

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

    @contextlib.contextmanager
    def reverse_tunnel(self, address: str, port: int) -> Iterator[Tunnel]:
        """For the life of the block, the host's sshd listens on its 127.0.0.1 (a free port, ``Tunnel.port``) and
        each connection to it is carried back over this SSH connection to ``address:port`` on this machine (like
        ``ssh -R 0:address:port``). How a host's dockerd pulls from healthdeploy's registry here, with nothing
        installed on the host. The bytes carried are counted."""
        transport = self.connection.transport
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"connection to {self.alias} was lost", "run the task again")
        if getattr(self, "_tunnel_open", False):
            raise HealthdeployError(f"internal: a second reverse tunnel on the connection to {self.alias}")
        open_pairs: set = set()
        state = {"closed": False}
        lock = threading.Lock()

        def carry(channel: paramiko.Channel, tunnel: Tunnel) -> None:
            try:
                sock = socket.create_connection((address, port), timeout=10)
            except OSError:
                channel.close()
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with lock:
                open_pairs.add((channel, sock))
                tunnel.connections += 1
            try:
                while not state["closed"]:
                    ready, _, _ = select.select([channel, sock], [], [], 1.0)
                    if channel in ready:
                        data = channel.recv(STREAM_RECV)
                        if not data:
                            break
                        sock.sendall(data)
                        tunnel.from_host += len(data)
                    if sock in ready:
                        data = sock.recv(1 << 20)
                        if not data:
                            break
                        channel.sendall(data)
                        tunnel.to_host += len(data)
            except (OSError, EOFError, paramiko.SSHException):
                pass
            finally:
                with lock:
                    open_pairs.discard((channel, sock))
                sock.close()
                channel.close()

        tunnel = Tunnel(0)

        def on_connection(channel, origin, server) -> None:  # in paramiko's thread: hand over at once
            threading.Thread(target=carry, args=(channel, tunnel), daemon=True, name=f"tunnel-{self.alias}").start()

        # Forwarded channels get the stream window (paramiko's default would cap a pull at a few MB/s).
        saved = transport.default_window_size, transport.default_max_packet_size
        transport.default_window_size, transport.default_max_packet_size = STREAM_WINDOW, STREAM_PACKET
        try:
            tunnel.port = transport.request_port_forward("127.0.0.1", 0, on_connection)
        except paramiko.SSHException:
            transport.default_window_size, transport.default_max_packet_size = saved
            raise HealthdeployError(f"{self.alias}: sshd refused a remote port forward (how images reach the host)",
                                    "set `AllowTcpForwarding yes` (or `remote`) for this user in the host's "
                                    "sshd_config, or BUILD_ON=host") from None
        self._tunnel_open = True
        try:
            yield tunnel
        finally:
            state["closed"] = True
            with contextlib.suppress(Exception):
                transport.cancel_port_forward("127.0.0.1", tunnel.port)
            with lock:
                pairs = list(open_pairs)
            for channel, sock in pairs:
                with contextlib.suppress(Exception):
                    sock.close()
                    channel.close()
            transport.default_window_size, transport.default_max_packet_size = saved
            self._tunnel_open = False

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
            on_line: Callable[[str], None] | None = None, structured: tuple[str, ...] = ()) -> Result:
        with self._connection_errors(command.description):
            return self._run(command, check, timeout, on_line, structured)

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
             on_line: Callable[[str], None] | None = None, structured: tuple[str, ...] = ()) -> Result:
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
        stderr = bytearray()  # only until the wrapper's first line is read; then the keeper has it
        kept = StderrKeeper(structured, what=f"{command.description} on {self.alias}")
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
                    kept.feed(chunk)
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
                        kept.feed(chunk)
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
        result = Result(status, bytes(stdout), bytes(stderr) + kept.finish())
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
        if not command.heartbeat_s:
            return HeldCommand(channel.close, "acquired", "")
        stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(channel, stop, command.heartbeat_s), daemon=True,
                         name=f"heartbeat to {self.alias}").start()

        def close() -> None:
            stop.set()
            channel.close()
        return HeldCommand(close, "acquired", "")

    def _emit(self, data: bytes, on_line: Callable[[str], None]) -> bytes:
        *lines, rest = data.split(b"\n")
        for line in lines:
            on_line(redact(line.decode("utf-8", "replace"), self.secrets))
        return rest

    def stream_to_file(self, command: Command, target: BinaryIO,
                       progress: Callable[[int], None] | None = None,
                       structured: tuple[str, ...] = ()) -> StreamResult:
        """Copy the command's stdout byte for byte into ``target`` at constant memory.

        The remote side checksums the same bytes; exit status, byte count and SHA-256 are compared.
        """
        started = time.monotonic()
        with self._connection_errors(command.description), \
                self._stream_channel(checksummed_stdout(command).render()) as channel:
            return self._receive(command, channel, target, progress, started, structured)

    def _receive(self, command: Command, channel: paramiko.Channel, target: BinaryIO,
                 progress: Callable[[int], None] | None, started: float,
                 structured: tuple[str, ...] = ()) -> StreamResult:
        channel.shutdown_write()
        digest = hashlib.sha256()
        total = 0
        stderr = StderrKeeper(structured, what=f"{command.description} on {self.alias}")
        channel.settimeout(0.5)
        last_report = 0.0
        while True:
            while channel.recv_stderr_ready():
                stderr.feed(channel.recv_stderr(1 << 16))
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
        self._drain_stderr(channel, keeper=stderr)
        status = channel.recv_exit_status()
        channel.close()
        target.flush()
        if progress:
            progress(total)
        remote_sha, rest = parse_checksum(stderr.finish().decode("utf-8", "replace"))
        result = StreamResult(total, digest.hexdigest(), remote_sha, status, time.monotonic() - started,
                              redact(rest, self.secrets))
        self._check_stream(command, result)
        return result

    def stream_from_file(self, command: Command, source: BinaryIO,
                         progress: Callable[[int], None] | None = None,
                         structured: tuple[str, ...] = ()) -> StreamResult:
        """Feed ``source`` to the command's stdin at constant memory, checksummed on both ends."""
        started = time.monotonic()
        with self._connection_errors(command.description), \
                self._stream_channel(checksummed_stdin(command).render()) as channel:
            return self._send(command, channel, source, progress, started, structured)

    def _send(self, command: Command, channel: paramiko.Channel, source: BinaryIO,
              progress: Callable[[int], None] | None, started: float,
              structured: tuple[str, ...] = ()) -> StreamResult:
        digest = hashlib.sha256()
        total = 0
        stderr = StderrKeeper(structured, what=f"{command.description} on {self.alias}")
        while True:
            data = source.read(1 << 20)
            if not data:
                break
            try:
                channel.sendall(data)
            except OSError:
                # The remote command ended early (full disk, a failed restore): its stderr says why.
                self._drain_stderr(channel, discard_stdout=True, keeper=stderr)
                status = channel.recv_exit_status() if channel.exit_status_ready() else -1
                channel.close()
                raise RemoteCommandError(f"{command.description} on {self.alias}", status,
                                         redact(parse_checksum(stderr.finish().decode("utf-8", "replace"))[1],
                                                self.secrets)
                                         or "the remote side closed the stream") from None
            digest.update(data)
            total += len(data)
            while channel.recv_stderr_ready():
                stderr.feed(channel.recv_stderr(1 << 16))
            while channel.recv_ready():  # the command's stdout is not wanted, but must not stall it
                channel.recv(1 << 20)
            if progress:
                progress(total)
        channel.shutdown_write()
        self._drain_stderr(channel, discard_stdout=True, keeper=stderr)
        status = channel.recv_exit_status()
        channel.close()
        remote_sha, rest = parse_checksum(stderr.finish().decode("utf-8", "replace"))
        result = StreamResult(total, digest.hexdigest(), remote_sha, status, time.monotonic() - started,
                              redact(rest, self.secrets))
        self._check_stream(command, result)
        return result

    @staticmethod
    def _drain_stderr(channel: paramiko.Channel, discard_stdout: bool = False,
                      keeper: "StderrKeeper | None" = None) -> bytes:
        """Read stderr until its EOF (into ``keeper`` when given). The exit status can arrive before the last
        stderr bytes (a process that outlives the command still holds stderr), so exit status alone is not the end."""
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
            if keeper is not None:
                keeper.feed(chunk)
            else:
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
