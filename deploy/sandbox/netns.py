"""The testbed: real hosts as network namespaces on one machine (docs/testbed.md).

Each node ``nodeN`` is a network namespace ``hd-nodeN`` with address 10.251.0.(N+1)/24 on a veth pair
whose other end is on the bridge ``hdbr0`` (10.251.0.1/24) in the root namespace. Inside it run
its own ``dockerd`` (own data root, exec root, socket, iptables, engine ID) and its own ``sshd`` on
port 22 whose sessions have ``DOCKER_HOST`` pointing at that engine, so ``ssh node1 docker info``
shows node1's engine. Both are started with ``nsenter --net`` (``ip netns exec`` remounts /sys and
hides the cgroup mounts dockerd needs) and ``--uts`` of a per-node UTS namespace (hostname = node
name, so engine names and Swarm node names differ).

Machine-wide state (one testbed per machine; every checkout can use it):
    /var/lib/healthdeploy-netns/<name>/   docker/ (data root, kept between runs), daemon.json, key.json,
                                          ssh/ (host key, sshd_config), dockerd.log
    /var/lib/healthdeploy-netns/authorized_keys   the client keys of every checkout that ran `testbed.up`
    /run/hd-netns/<name>/                 exec/, docker.sock, docker.pid, sshd.pid, uts (gone at boot)
    /var/lib/healthdeploy-netns/registry/ the registry's storage (registry.yml, registry.log beside it)
The checkout's ``.sandbox/ssh_config`` and ``known_hosts`` get ``Host nodeN`` entries next to the
loopback sandbox hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from deploy.core.errors import HealthdeployError, UsageError
from deploy.execute.local import pipe_local, run_local, spawn_local
from deploy.sandbox import hosts, setup
from deploy.sandbox.hosts import STATE_DIR

BRIDGE = "hdbr0"
SUBNET = ipaddress.ip_network("10.251.0.0/24")
BRIDGE_ADDRESS = "10.251.0.1"
REGISTRY = f"{BRIDGE_ADDRESS}:5000"
DATA_ROOT = Path("/var/lib/healthdeploy-netns")
RUN_ROOT = Path("/run/hd-netns")
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "hd-"
VETH_PREFIX = "hdv-"
AUTHORIZED_KEYS = DATA_ROOT / "authorized_keys"
REGISTRY_DIR = DATA_ROOT / "registry"
REGISTRY_CONFIG = DATA_ROOT / "registry.yml"
REGISTRY_LOG = DATA_ROOT / "registry.log"
REGISTRY_PID = RUN_ROOT / "registry.pid"
MAIN_DAEMON_JSON = Path("/etc/docker/daemon.json")
FORWARD_RULE = ["DOCKER-USER", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
MAX_NODES = 250
STOP_TIMEOUT = 30.0


def _say(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    port: int = 22

    @property
    def address(self) -> str:
        return str(SUBNET.network_address + self.index + 1)

    @property
    def netns(self) -> str:
        return f"{NS_PREFIX}{self.name}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def veth(self) -> str:
        """The root namespace's end of the node's veth pair (on the bridge); ``eth0`` inside."""
        return f"{VETH_PREFIX}{self.name}"

    @property
    def data_dir(self) -> Path:
        return DATA_ROOT / self.name

    @property
    def docker_root(self) -> Path:
        return self.data_dir / "docker"

    @property
    def daemon_json(self) -> Path:
        return self.data_dir / "daemon.json"

    @property
    def dockerd_log(self) -> Path:
        return self.data_dir / "dockerd.log"

    @property
    def ssh_dir(self) -> Path:
        return self.data_dir / "ssh"

    @property
    def sshd_config_path(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key"

    def host_key_pub(self, state_dir: Path = STATE_DIR) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key.pub"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def docker_pid(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def sshd_pid(self) -> Path:
        return self.run_dir / "sshd.pid"

    @property
    def uts(self) -> Path:
        return self.run_dir / "uts"

    @property
    def cgroup_parent(self) -> str:
        return f"/hd-netns-{self.name}"


def node_for(name: str) -> Node:
    """``node1`` -> 10.251.0.2, ``node2`` -> 10.251.0.3, ... (10.251.0.1 is the bridge)."""
    if not (name.startswith("node") and name[4:].isdigit() and not name[4:].startswith("0")):
        raise UsageError(f"invalid testbed node name {name!r}", "use node1, node2, ...")
    index = int(name[4:])
    if not 1 <= index <= MAX_NODES:
        raise UsageError(f"testbed node {name} out of range", f"use node1 .. node{MAX_NODES}")
    return Node(name, index)


def parse_names(text: str) -> list[Node]:
    nodes = [node_for(n.strip()) for n in text.split(",") if n.strip()]
    if not nodes:
        raise UsageError("no testbed nodes given", "pass --hosts node1,node2")
    return list(dict.fromkeys(nodes))


# -- pure builders ---------------------------------------------------------------------------------
def dockerd_args(node: Node) -> list[str]:
    """The node's dockerd command line (what /proc/<pid>/cmdline shows once nsenter has exec'd it)."""
    return ["dockerd", "--config-file", str(node.daemon_json), "--data-root", str(node.docker_root),
            "--exec-root", str(node.exec_root), "-H", node.docker_host, "--pidfile", str(node.docker_pid),
            "--insecure-registry", REGISTRY, "--cgroup-parent", node.cgroup_parent]


def in_node(node: Node, argv: list[str]) -> list[str]:
    """Run ``argv`` in the node's network and UTS namespaces (its own file system view stays the machine's)."""
    return ["nsenter", f"--net={node.netns_path}", f"--uts={node.uts}", *argv]


def daemon_json(node: Node) -> str:
    # Its own config file: the machine's /etc/docker/daemon.json is the main engine's (and a key set there
    # and as a flag here would stop dockerd). Its own trust key: a distinct engine ID per node.
    return json.dumps({"deprecated-key-path": str(node.data_dir / "key.json")}, indent=2) + "\n"


def sshd_config(node: Node) -> str:
    return hosts.sshd_config_text(f"{node.address}:{node.port}", node.host_key, node.sshd_pid, AUTHORIZED_KEYS,
                                  env={"DOCKER_HOST": node.docker_host})


def registry_config() -> str:
    return "\n".join([
        "# Written by healthdeploy's testbed (deploy/sandbox/netns.py).",
        "version: 0.1",
        "log:",
        "  level: warn",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {REGISTRY_DIR}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {REGISTRY}",
        "",
    ])


def image_ids(listing: str) -> dict[str, str]:
    """``docker images --format '{{.Repository}}:{{.Tag}} {{.ID}}'`` output -> {tag: image ID}."""
    ids = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and "<none>" not in parts[0]:
            ids[parts[0]] = parts[1]
    return ids


def images_to_load(tags: list[str], main: dict[str, str], node: dict[str, str]) -> list[str]:
    """The tags a node engine lacks or has with another image ID than the main engine."""
    return [t for t in tags if node.get(t) != main[t]]


# -- small machine helpers -------------------------------------------------------------------------
def _write_if_changed(path: Path, text: str, mode: int | None = None) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    if mode is not None:
        tmp.chmod(mode)
    tmp.replace(path)
    return True


def _link_exists(name: str) -> bool:
    return (Path("/sys/class/net") / name).exists()


def _link_admin_up(name: str) -> bool:
    try:
        return int((Path("/sys/class/net") / name / "flags").read_text(), 16) & 1 == 1
    except (OSError, ValueError):
        return False


def _link_master(name: str) -> str | None:
    master = Path("/sys/class/net") / name / "master"
    return master.resolve().name if master.exists() else None


def _netns_exists(node: Node) -> bool:
    return node.netns_path.exists()


def _ip(*args: str, check: bool = True):
    return run_local(["ip", *args], check=check)


def _mounts_under(*roots: Path) -> list[str]:
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(r) or point.startswith(str(r) + "/") for r in roots):
            found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _is_mounted(path: Path) -> bool:
    return str(path) in _mounts_under(path)


def _pids_matching(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            if text in " ".join(setup.process_args(int(proc.name))):
                pids.append(int(proc.name))
    return pids


def _pids_in_cgroup(parent: str) -> list[int]:
    pids: set[int] = set()
    root = Path("/sys/fs/cgroup/pids") / parent.lstrip("/")
    if root.is_dir():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def _remove_cgroups(parent: str) -> None:
    """The node engine's (empty) cgroup directories, in every hierarchy."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").is_dir() else ():
        root = hierarchy / parent.lstrip("/")
        if root.is_dir() and not root.is_symlink():
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def _kill_all(pids: list[int], grace: float = 3.0) -> int:
    live = [p for p in pids if setup.process_alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(setup.process_alive(p) for p in live):
        time.sleep(0.1)
    for pid in live:
        if setup.process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return len(live)


def _rss_kib(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One testbed change at a time on this machine (two checkouts running `testbed.up` at once)."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- what exists -----------------------------------------------------------------------------------
def dockerd_pid(node: Node) -> int | None:
    return setup.live_pid(node.docker_pid, str(node.socket))


def sshd_pid(node: Node) -> int | None:
    return setup.live_pid(node.sshd_pid, str(node.sshd_config_path))


def known_nodes() -> list[Node]:
    """Every node of ours this machine has a trace of: a namespace, a veth, or a run directory."""
    names: set[str] = set()
    if NETNS_DIR.is_dir():
        names.update(p.name[len(NS_PREFIX):] for p in NETNS_DIR.iterdir() if p.name.startswith(NS_PREFIX + "node"))
    net = Path("/sys/class/net")
    if net.is_dir():
        names.update(p.name[len(VETH_PREFIX):] for p in net.iterdir() if p.name.startswith(VETH_PREFIX + "node"))
    if RUN_ROOT.is_dir():
        names.update(p.name for p in RUN_ROOT.iterdir() if p.is_dir() and p.name.startswith("node"))
    nodes = []
    for name in names:
        with contextlib.suppress(HealthdeployError):
            nodes.append(node_for(name))
    return sorted(nodes, key=lambda n: n.index)


def running_nodes() -> list[Node]:
    """Nodes whose namespace exists and whose sshd runs (what ssh_config lists)."""
    return [n for n in known_nodes() if _netns_exists(n) and sshd_pid(n) and n.host_key_pub().exists()]


# -- the bridge and the forward rule ---------------------------------------------------------------
def _bridge_addresses() -> list[str]:
    out = _ip("-4", "-o", "addr", "show", "dev", BRIDGE).stdout
    return [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]


def ensure_bridge() -> list[str]:
    actions = []
    foreign = [line.split()[1] for line in _ip("-4", "-o", "addr", "show", "to", str(SUBNET)).stdout.splitlines()
               if len(line.split()) > 1 and line.split()[1] != BRIDGE]
    if foreign:
        raise HealthdeployError(f"{SUBNET} is already used on {', '.join(foreign)}",
                                "the testbed needs that subnet on its bridge hdbr0; remove the other address")
    if not _link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
        actions.append(f"created bridge {BRIDGE}")
    wanted = f"{BRIDGE_ADDRESS}/{SUBNET.prefixlen}"
    if wanted not in _bridge_addresses():
        _ip("addr", "add", wanted, "dev", BRIDGE)
    if not _link_admin_up(BRIDGE):
        _ip("link", "set", BRIDGE, "up")
    return actions


def _iptables(*args: str, check: bool = False):
    return run_local(["iptables", "-w", "10", *args], check=check)


def ensure_forward_rule() -> bool:
    """Bridged traffic between nodes crosses the root namespace's FORWARD chain, whose policy the main
    engine sets to DROP; DOCKER-USER is the chain it leaves to us."""
    if _iptables("-C", *FORWARD_RULE).ok:
        return False
    if not _iptables("-S", "DOCKER-USER").ok:
        raise HealthdeployError("iptables chain DOCKER-USER is missing", "the machine's Docker engine creates it: run `inv sandbox.install`")
    result = _iptables("-I", *FORWARD_RULE)
    if not result.ok:
        raise HealthdeployError(f"iptables -I {' '.join(FORWARD_RULE)} failed: {result.stderr.strip()[-200:]}")
    return True


def remove_forward_rule() -> None:
    for _ in range(10):  # idempotent: also removes duplicates an older run may have left
        if not _iptables("-C", *FORWARD_RULE).ok:
            return
        _iptables("-D", *FORWARD_RULE)


def remove_bridge() -> bool:
    if _link_exists(BRIDGE):
        _ip("link", "del", BRIDGE, check=False)
        return True
    return False


# -- one node --------------------------------------------------------------------------------------
def _ensure_link(node: Node) -> list[str]:
    actions = []
    if not _netns_exists(node):
        if _link_exists(node.veth):  # half-made by a crashed run
            _ip("link", "del", node.veth, check=False)
        _ip("netns", "add", node.netns)
        _ip("-n", node.netns, "link", "set", "lo", "up")
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("-n", node.netns, "addr", "add", f"{node.address}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        actions.append(f"created namespace {node.netns} ({node.address})")
    if not _link_exists(node.veth):
        raise HealthdeployError(f"{node.name}: namespace {node.netns} exists without its veth {node.veth}",
                                "run `inv testbed.down` and try again")
    if _link_master(node.veth) != BRIDGE:
        _ip("link", "set", node.veth, "master", BRIDGE)
    if not _link_admin_up(node.veth):
        _ip("link", "set", node.veth, "up")
        if not actions:
            actions.append(f"healed {node.veth}")
    if not node.uts.exists() or not _is_mounted(node.uts):
        node.run_dir.mkdir(parents=True, exist_ok=True)
        node.uts.touch()
        run_local(["unshare", f"--uts={node.uts}", "hostname", node.name])
    return actions


def _start_dockerd(node: Node) -> list[str]:
    pid = dockerd_pid(node)
    changed = _write_if_changed(node.daemon_json, daemon_json(node))
    if pid and (changed or setup.process_args(pid) != dockerd_args(node)):
        _say(f"{node.name}: dockerd's settings changed; restarting it")
        _stop_pid(pid, STOP_TIMEOUT)
        pid = None
    if pid:
        return []
    for stale in (node.docker_pid, node.socket, node.exec_root / "containerd" / "containerd.pid"):
        stale.unlink(missing_ok=True)
    node.docker_root.mkdir(parents=True, exist_ok=True)
    node.exec_root.mkdir(parents=True, exist_ok=True)
    spawn_local(in_node(node, dockerd_args(node)), str(node.dockerd_log))
    return ["started dockerd"]


def _wait_dockerd(node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline:
        if node.socket.exists() and setup.engine_answers(node.docker_host, timeout=10):
            return
        pid = dockerd_pid(node)
        seen = seen or pid is not None
        if seen and pid is None:
            break  # it wrote its pid file, then died
        time.sleep(0.2)
    last = node.dockerd_log.read_text(errors="replace").strip().splitlines()[-1:] if node.dockerd_log.exists() else []
    raise HealthdeployError(f"{node.name}: dockerd did not answer on {node.socket}" + (f": {last[0][-300:]}" if last else ""),
                            f"see {node.dockerd_log}")


def _start_sshd(node: Node) -> list[str]:
    node.ssh_dir.mkdir(parents=True, exist_ok=True)
    if not node.host_key.exists():
        run_local(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.name}-hostkey", "-f", str(node.host_key)])
    changed = _write_if_changed(node.sshd_config_path, sshd_config(node))
    sshd = setup.require("sshd")
    pid = sshd_pid(node)
    if pid and changed:
        run_local([sshd, "-t", "-f", str(node.sshd_config_path)])
        os.kill(pid, signal.SIGHUP)  # sshd re-executes itself with the new config
        return ["reloaded sshd"]
    if pid:
        return []
    node.sshd_pid.unlink(missing_ok=True)
    run_local([sshd, "-t", "-f", str(node.sshd_config_path)])
    run_local(in_node(node, [sshd, "-f", str(node.sshd_config_path)]))
    return ["started sshd"]


def _wait_sshd(node: Node, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not _tcp_open(node.address, node.port):
        if time.monotonic() > deadline:
            raise HealthdeployError(f"{node.name}: sshd does not listen on {node.address}:{node.port}",
                                    "is the node cut off? `inv testbed.heal " + node.name + "`")
        time.sleep(0.05)


def _stop_pid(pid: int | None, timeout: float) -> bool:
    if not pid:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while setup.process_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    return True


def stop_node(node: Node) -> list[str]:
    """Stop and remove everything of one node except its data (data root, host key): by pid file first,
    then by name (processes in its namespace or cgroup, or naming its run directory), then the mounts
    under its run directory, its namespace and its veth."""
    done = []
    if _stop_pid(sshd_pid(node), 5):
        done.append("sshd")
    if _stop_pid(dockerd_pid(node), STOP_TIMEOUT):  # dockerd stops its containers and containerd first
        done.append("dockerd")
    leftovers = set(_pids_matching(f"{node.run_dir}/")) | set(_pids_in_cgroup(node.cgroup_parent))
    if _netns_exists(node):
        result = _ip("netns", "pids", node.netns, check=False)
        leftovers.update(int(p) for p in result.stdout.split() if p.isdigit())
    if leftovers and _kill_all(sorted(leftovers)):
        done.append(f"{len(leftovers)} leftover process(es)")
    _remove_cgroups(node.cgroup_parent)
    for point in _mounts_under(node.run_dir, node.docker_root):
        if not run_local(["umount", point], check=False).ok:
            run_local(["umount", "-l", point], check=False)
    if _netns_exists(node):
        _ip("netns", "del", node.netns, check=False)
        done.append(f"namespace {node.netns}")
    if _link_exists(node.veth):
        _ip("link", "del", node.veth, check=False)
    if node.run_dir.exists() and not _mounts_under(node.run_dir):
        for path in sorted(node.run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        with contextlib.suppress(OSError):
            node.run_dir.rmdir()
    return done


def _remove_stale() -> list[str]:
    """What a crashed run left: a namespace, veth or run directory without a live dockerd; a dead
    registry's pid file; a bridge that no live node uses."""
    removed = []
    for node in known_nodes():
        if not (_netns_exists(node) and _link_exists(node.veth) and dockerd_pid(node)):
            stop_node(node)
            removed.append(node.name)
    if removed:
        _say(f"removed stale {', '.join(removed)} (left by an earlier run)")
    if REGISTRY_PID.exists() and registry_pid() is None:
        REGISTRY_PID.unlink(missing_ok=True)
    if _link_exists(BRIDGE) and not [n for n in known_nodes() if _netns_exists(n)] and registry_pid() is None:
        remove_bridge()  # recreated fresh below
    return removed


def _authorize(pub_key: Path) -> None:
    key = pub_key.read_text().strip()
    lines = AUTHORIZED_KEYS.read_text().splitlines() if AUTHORIZED_KEYS.exists() else []
    if key not in lines:
        _write_if_changed(AUTHORIZED_KEYS, "\n".join([*lines, key]) + "\n", mode=0o600)


# -- images ----------------------------------------------------------------------------------------
def _engine_images(host: str | None) -> dict[str, str]:
    argv = ["docker"] + (["-H", host] if host else []) + ["images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"]
    return image_ids(run_local(argv, timeout=120).stdout)


def deliver_images(nodes: list[Node], tags: list[str] | None = None) -> dict[str, list[str]]:
    """The offline images from the main engine into each node engine: one ``docker save`` of the tags a
    group of nodes lacks (shared layers once), fed to each of their ``docker load``; nothing when every
    node already has every tag with the same image ID."""
    from deploy.sandbox import images

    tags = tags or images.all_tags()
    main = _engine_images(None)
    absent = [t for t in tags if t not in main]
    if absent:
        raise HealthdeployError(f"images missing in the main engine: {', '.join(absent)}", "run `inv images.build`")
    groups: dict[tuple[str, ...], list[Node]] = {}
    loaded: dict[str, list[str]] = {}
    for node in nodes:
        need = tuple(images_to_load(tags, main, _engine_images(node.docker_host)))
        loaded[node.name] = list(need)
        if need:
            groups.setdefault(need, []).append(node)
    for need, group in groups.items():
        started = time.monotonic()
        _say(f"loading {len(need)} image(s) into {', '.join(n.name for n in group)} (docker save | docker load)")
        pipe_local(["docker", "save", *need], [["docker", "-H", n.docker_host, "load", "-q"] for n in group],
                   timeout=1800)
        _say(f"loaded in {time.monotonic() - started:.0f}s")
        for node in group:
            wrong = images_to_load(list(need), main, _engine_images(node.docker_host))
            if wrong:
                raise HealthdeployError(f"{node.name}: {', '.join(wrong)} differ from the main engine after docker load")
    return loaded


# -- the whole testbed -----------------------------------------------------------------------------
@dataclass
class NodeReport:
    node: Node
    actions: list[str] = field(default_factory=list)
    engine_id: str = ""

    def line(self) -> str:
        what = "; ".join(self.actions) or "unchanged"
        return (f"{self.node.name}: ssh -F .sandbox/ssh_config {self.node.name}  ({self.node.address}, "
                f"engine {self.engine_id[:14]}; {what})")


def up(names: list[str], state_dir: Path = STATE_DIR, install: bool = True, images: bool = True) -> list[NodeReport]:
    """Bring up the named nodes (idempotent: what runs and is right is left alone) and write their
    ssh_config + known_hosts entries. Images are not built here (`inv images.build` does; image tags are
    machine-wide): the ones the main engine has are delivered."""
    nodes = parse_names(",".join(names))
    if install:
        setup.ensure_machine(setup.TESTBED_TOOLS)
    pub = hosts.ensure_client_key(state_dir)
    reports = {n.name: NodeReport(n) for n in nodes}
    with _locked():
        for name in _remove_stale():
            if name in reports:
                reports[name].actions.append("removed stale leftovers")
        ensure_bridge()
        ensure_forward_rule()
        _authorize(pub)
        for node in nodes:
            reports[node.name].actions += _ensure_link(node)
        for node in nodes:  # all engines start at once; each takes ~0.3 s
            reports[node.name].actions += _start_dockerd(node)
        for node in nodes:
            _wait_dockerd(node)
            reports[node.name].actions += _start_sshd(node)
        for node in nodes:
            _wait_sshd(node)
        if images:
            for name, tags in deliver_images(nodes).items():
                if tags:
                    reports[name].actions.append(f"loaded {len(tags)} image(s)")
        for node in nodes:
            reports[node.name].engine_id = run_local(["docker", "-H", node.docker_host, "info", "--format", "{{.ID}}"]).stdout.strip()
    hosts.write_client_files(state_dir, extra=nodes)
    return [reports[n.name] for n in nodes]


def down(names: list[str] | None = None, state_dir: Path = STATE_DIR, purge: bool = False) -> list[str]:
    """Stop the named nodes (default: all, then the registry, the bridge and the forward rule). Data
    roots and host keys stay for the next `up` unless ``purge`` (then the next `up` is a cold one)."""
    stopped = []
    with _locked():
        nodes = parse_names(",".join(names)) if names else known_nodes()
        if purge and not names and DATA_ROOT.is_dir():
            nodes = sorted({*nodes, *(node_for(p.name) for p in DATA_ROOT.iterdir()
                                      if p.is_dir() and p.name.startswith("node") and p.name[4:].isdigit())},
                           key=lambda n: n.index)
        for node in nodes:
            if stop_node(node):
                stopped.append(node.name)
            if purge:
                _purge(node.data_dir)
        everything = not names or not [n for n in known_nodes() if _netns_exists(n)]
        if everything:
            if stop_registry():
                stopped.append("registry")
            remove_bridge()
            remove_forward_rule()
            if purge and not names:
                _purge(REGISTRY_DIR)
    hosts.write_client_files(state_dir)
    return stopped


def _purge(directory: Path) -> None:
    if _mounts_under(directory):
        raise HealthdeployError(f"{directory} still has mounts ({', '.join(_mounts_under(directory)[:3])})",
                                "not removing it; unmount them and run `inv testbed.down --purge` again")
    shutil.rmtree(directory, ignore_errors=True)


def cut(name: str) -> None:
    """Cut a node off the bridge (its veth down): nothing reaches it, it reaches nothing; it keeps running."""
    node = node_for(name)
    with _locked():
        if not _link_exists(node.veth):
            raise HealthdeployError(f"{name} is not up", f"run `inv testbed.up --hosts {name}`")
        _ip("link", "set", node.veth, "down")


def heal(name: str, timeout: float = 10) -> None:
    node = node_for(name)
    with _locked():
        if not _link_exists(node.veth):
            raise HealthdeployError(f"{name} is not up", f"run `inv testbed.up --hosts {name}`")
        _ip("link", "set", node.veth, "up")
    if sshd_pid(node):
        _wait_sshd(node, timeout)


def is_cut(name: str) -> bool:
    node = node_for(name)
    return _link_exists(node.veth) and not _link_admin_up(node.veth)


def status() -> list[dict]:
    rows = []
    for node in known_nodes():
        dpid = dockerd_pid(node)
        cpid = setup.live_pid(node.exec_root / "containerd" / "containerd.pid", "containerd")
        rows.append({
            "node": node.name, "address": node.address, "namespace": _netns_exists(node),
            "link": "up" if _link_admin_up(node.veth) else ("cut" if _link_exists(node.veth) else "absent"),
            "dockerd_pid": dpid, "dockerd_rss_kib": _rss_kib(dpid), "containerd_pid": cpid,
            "containerd_rss_kib": _rss_kib(cpid), "sshd_pid": sshd_pid(node),
            "engine": setup.engine_answers(node.docker_host, timeout=5) if dpid else False,
        })
    return rows


# -- the registry ----------------------------------------------------------------------------------
def registry_pid() -> int | None:
    return setup.live_pid(REGISTRY_PID, str(REGISTRY_CONFIG))


def _registry_answers(timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def main_engine_trusts_registry() -> bool:
    info = json.loads(run_local(["docker", "info", "--format", "{{json .RegistryConfig}}"]).stdout)
    index = (info.get("IndexConfigs") or {}).get(REGISTRY)
    if index is not None and not index.get("Secure", True):
        return True
    address = ipaddress.ip_address(BRIDGE_ADDRESS)
    return any(address in ipaddress.ip_network(cidr) for cidr in info.get("InsecureRegistryCIDRs") or ())


def _trust_registry_in_main_engine(timeout: float = 15) -> bool:
    """The main engine pushes to the registry over plain HTTP: add it to /etc/docker/daemon.json's
    insecure-registries and SIGHUP dockerd (a live reload: the engine and its containers keep running)."""
    if main_engine_trusts_registry():
        return False
    config = json.loads(MAIN_DAEMON_JSON.read_text() or "{}") if MAIN_DAEMON_JSON.exists() else {}
    registries = config.setdefault("insecure-registries", [])
    if REGISTRY not in registries:
        registries.append(REGISTRY)
        _write_if_changed(MAIN_DAEMON_JSON, json.dumps(config, indent=2) + "\n")
    _say(f"main engine: {REGISTRY} added to {MAIN_DAEMON_JSON} insecure-registries; reloading dockerd (SIGHUP)")
    setup.reload_dockerd()
    deadline = time.monotonic() + timeout
    while not main_engine_trusts_registry():
        if time.monotonic() > deadline:
            raise HealthdeployError(f"the main engine did not pick up insecure-registries {REGISTRY} after SIGHUP",
                                    f"check {MAIN_DAEMON_JSON} and {setup.DOCKERD_LOG} (a flag given twice stops the reload)")
        time.sleep(0.3)
    return True


def ensure_registry(timeout: float = 30) -> str:
    """Debian's docker-registry (distribution 2.8) on 10.251.0.1:5000, storage under the testbed's data
    dir, in the background with a pid file; the main engine and every node engine may push and pull.
    Returns the registry address."""
    setup.ensure_tools(setup.REGISTRY_TOOLS)
    binary = setup.require("docker-registry")
    with _locked():
        ensure_bridge()
        ensure_forward_rule()
        changed = _write_if_changed(REGISTRY_CONFIG, registry_config())
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        pid = registry_pid()
        if pid and (changed or not _registry_answers()):
            _stop_pid(pid, 10)
            pid = None
        if pid is None:
            if _tcp_open(BRIDGE_ADDRESS, 5000):
                raise HealthdeployError(f"another process listens on {REGISTRY}", "stop it (not ours: no pid file)")
            pid = spawn_local([binary, "serve", str(REGISTRY_CONFIG)], str(REGISTRY_LOG))
            REGISTRY_PID.write_text(f"{pid}\n")
            deadline = time.monotonic() + timeout
            while not _registry_answers():
                if time.monotonic() > deadline or not setup.process_alive(pid):
                    last = REGISTRY_LOG.read_text(errors="replace").strip().splitlines()[-1:]
                    raise HealthdeployError(f"the registry did not answer on http://{REGISTRY}/v2/"
                                            + (f": {last[0][-300:]}" if last else ""), f"see {REGISTRY_LOG}")
                time.sleep(0.1)
            _say(f"registry on {REGISTRY} (pid {pid}, storage {REGISTRY_DIR})")
        _trust_registry_in_main_engine()
    return REGISTRY


def stop_registry() -> bool:
    stopped = _stop_pid(registry_pid(), 10)
    REGISTRY_PID.unlink(missing_ok=True)
    return stopped
