"""Build-off-host benchmark, side by side with its baseline in the same run (issue: builds off the serving host).

On one test-bed node (its own dockerd and sshd; HEALTHDEPLOY_BENCH_NODE, default node15), made fresh first (its
engine's data purged, the test bed's offline images loaded again: a host that has the base images but never
pulled from healthdeploy), with a fresh shipping registry:

1. `fab deploy` with BUILD_ON=operator, first deploy and then a one-file change (backend/build_id): wall time,
   bytes shipped into the host (counted at its reverse tunnel), seconds of the ship, push and build seconds;
2. the baseline of the same images: `docker save IMAGE... | ssh host docker load` (first: the 4 app images;
   one-file change: the changed image), bytes counted on the pipe;
3. for context, today's BUILD_ON=host: the same two deploys building on the host itself.
For every row: CPU seconds spent on the serving host (its dockerd, containerd, sshd with its sessions, and
every container in its cgroup), the cost the issue is about.

Prints a Markdown report and writes it to bench/results/build-<time>.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# fab and inv of this Python, no version-manager shim in between, importing this checkout (as the tests do).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from deploy.sandbox import images, netns, setup  # noqa: E402
from deploy.sandbox.hosts import STATE_DIR  # noqa: E402

NODE = netns.node_for(os.environ.get("HEALTHDEPLOY_BENCH_NODE", "node15"))
APP_SERVICES = ("backend", "ai-service", "frontend-web", "frontend-patient")
TICK = os.sysconf("SC_CLK_TCK")


def node_cpu_seconds(node: netns.Node) -> float:
    """CPU used so far on the node: its containers (cgroup) + its dockerd, containerd and sshd (with reaped
    children: every SSH session and what it ran)."""
    total = 0.0
    usage = Path("/sys/fs/cgroup/cpuacct") / node.cgroup_parent.lstrip("/") / "cpuacct.usage"
    if usage.exists():
        total += int(usage.read_text()) / 1e9
    pids = [netns.dockerd_pid(node), netns.sshd_pid(node),
            setup.live_pid(node.exec_root / "containerd" / "containerd.pid", "containerd")]
    for pid in pids:
        if not pid:
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / TICK  # utime stime cutime cstime
    return total


class Bench:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hd-buildbench-"))
        self.app = self.dir / "app"
        shutil.copytree(ROOT / "deploy" / "sandbox" / "app", self.app, ignore=shutil.ignore_patterns("__pycache__"))
        self.cache = self.dir / "cache"

    def env_name(self, build_on: str) -> str:
        return "bbo" if build_on == "operator" else "bbh"

    def write_env(self, build_on: str) -> str:
        name = self.env_name(build_on)
        base = (ROOT / "env" / "sandbox.env").read_text().splitlines()
        values = {"HOSTS": NODE.name, "DEPLOY_PATH": "/var/lib/healthdeploy-bench/{host}/{env}",
                  "COMPOSE_PROJECT": "hd-b{env}-{host}", "APP_SOURCE": str(self.app), "KEEP_RELEASES": "3",
                  "SSH_CONFIG": str(STATE_DIR / "ssh_config"), "SSH_KNOWN_HOSTS": str(STATE_DIR / "known_hosts"),
                  "BUILD_ON": build_on, "BUILD_CACHE": str(self.cache)}
        lines = [line for line in base if line.split("=", 1)[0] not in values]
        (self.dir / f"{name}.env").write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")
        return name

    def deploy(self, build_on: str) -> dict:
        name = self.write_env(build_on)
        cpu = node_cpu_seconds(NODE)
        started = time.monotonic()
        proc = subprocess.run(["fab", "deploy", "--env", name, "--json"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "HEALTHDEPLOY_ENV_DIR": str(self.dir)})
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench: deploy ({build_on}) failed:\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout[proc.stdout.index("{"):])
        return {"wall": wall, "cpu": node_cpu_seconds(NODE) - cpu, "host": data["hosts"][0],
                "build": data.get("build") or {}}

    def set_build(self, build: str) -> None:
        (self.app / "backend" / "build_id").write_text(build + "\n")

    def cleanup_stack(self, build_on: str) -> None:
        name = self.env_name(build_on)
        project = f"hd-b{name}-{NODE.name}"
        docker = ["docker", "-H", NODE.docker_host]
        ids = run(docker + ["ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"]).split()
        if ids:
            run(docker + ["rm", "-f", "-v", *ids])
        run(docker + ["network", "rm", f"{project}_default"], check=False)
        volumes = run(docker + ["volume", "ls", "-q", "--filter", f"name={project}_"]).split()
        if volumes:
            run(docker + ["volume", "rm", *volumes], check=False)
        tags = [t for t in run(docker + ["images", "--format", "{{.Repository}}:{{.Tag}}"]).split()
                if t.startswith((f"healthdeploy/{project}/", f"healthdeploy/build-{name}/"))]
        if tags:
            run(docker + ["image", "rm", *tags], check=False)
        shutil.rmtree(f"/var/lib/healthdeploy-bench/{NODE.name}/{name}", ignore_errors=True)

    def cleanup(self) -> None:
        for build_on in ("operator", "host"):
            self.cleanup_stack(build_on)
        local = run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter",
                     "reference=healthdeploy/build-bbo/*"]).split()
        if local:
            run(["docker", "image", "rm", *local], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(argv: list[str], check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed: {proc.stderr[-500:]}")
    return proc.stdout


def save_load(tags: list[str]) -> dict:
    """The baseline: `docker save TAGS | ssh host docker load`, the bytes counted on the pipe between them."""
    cpu = node_cpu_seconds(NODE)
    started = time.monotonic()
    save = subprocess.Popen(["docker", "save", *tags], stdout=subprocess.PIPE)
    load = subprocess.Popen(["ssh", "-F", str(STATE_DIR / "ssh_config"), NODE.name, "docker", "load", "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sent = 0
    for chunk in iter(lambda: save.stdout.read(1 << 20), b""):
        load.stdin.write(chunk)
        sent += len(chunk)
    out, err = load.communicate()  # closes its stdin: end of the stream
    if save.wait() != 0 or load.returncode != 0:
        raise SystemExit(f"bench: docker save | ssh docker load failed: {err.decode()[-500:]}")
    return {"wall": time.monotonic() - started, "bytes": sent, "cpu": node_cpu_seconds(NODE) - cpu}


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def main() -> int:
    setup.ensure_machine(setup.TESTBED_TOOLS)
    setup.ensure_tools(setup.REGISTRY_TOOLS)
    if any(images.image_label(tag) is None for tag in images.all_tags()):
        images.build_all()
    print(f"bench: making {NODE.name} fresh (engine data purged, offline images loaded again)", file=sys.stderr)
    netns.down([NODE.name], purge=True)
    netns.up([NODE.name])
    bench = Bench()
    results: dict[str, dict] = {}
    try:
        # 1. BUILD_ON=operator: first deploy, then a one-file change
        bench.set_build("backend-bench-1")
        results["op1"] = bench.deploy("operator")
        bench.set_build("backend-bench-2")
        results["op2"] = bench.deploy("operator")
        first = [f"healthdeploy/build-bbo/{s}:{results['op1']['host']['release']}" for s in APP_SERVICES]
        second = [f"healthdeploy/build-bbo/{s}:{results['op2']['host']['release']}" for s in results["op2"]["build"]["services"]]
        bench.cleanup_stack("operator")
        # 2. the baseline, the same images: all four, then the changed one
        results["sl1"] = save_load(first)
        results["sl2"] = save_load(second)
        run(["docker", "-H", NODE.docker_host, "image", "rm", *first, *second], check=False)
        # 3. today's behaviour for context: the host builds (it never built these: no build cache there)
        bench.set_build("backend-bench-1")
        results["h1"] = bench.deploy("host")
        bench.set_build("backend-bench-2")
        results["h2"] = bench.deploy("host")
    finally:
        bench.cleanup()
    text = report(results)
    print(text)
    out = ROOT / "bench" / "results" / f"build-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M}.md"
    out.write_text(text)
    return 0


def report(r: dict) -> str:
    op1, op2, sl1, sl2, h1, h2 = (r[k] for k in ("op1", "op2", "sl1", "sl2", "h1", "h2"))
    load = os.getloadavg()[0]
    lines = [
        "# Build-off-host benchmark", "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores shared with other work "
        f"(load average {load:.1f} at the end), target {NODE.name} (test-bed node: own dockerd and sshd, reached over "
        "SSH on a bridge), made fresh first; a fresh shipping registry. Images: the sample app, 4 images over one "
        "555 MB base layer. The operator's machine builds with a warm build cache (it has built the sample app before).",
        "",
        "| measure | BUILD_ON=operator (registry over SSH) | baseline: docker save \\| ssh docker load | ratio | BUILD_ON=host (today) |",
        "|---|---|---|---|---|",
        f"| first deploy: bytes into the host | {mb(op1['host']['shipped_bytes'])} | {mb(sl1['bytes'])} | "
        f"{op1['host']['shipped_bytes'] / sl1['bytes']:.3f} | {mb(h1['host']['uploaded_bytes'])} (release files only) |",
        f"| first deploy: transfer seconds (ship vs save\\|load) | {op1['host']['shipped_seconds']:.1f} | {sl1['wall']:.1f} | "
        f"{op1['host']['shipped_seconds'] / sl1['wall']:.2f} | - |",
        f"| first deploy: push into the registry here (s, gzip of new layers) | {op1['build']['push_seconds']:.1f} | - | - | - |",
        f"| first deploy: deploy wall time (s) | {op1['wall']:.1f} | - | - | {h1['wall']:.1f} |",
        f"| first deploy: CPU seconds on the serving host | {op1['cpu']:.1f} | {sl1['cpu']:.1f} (transfer only) | "
        f"{op1['cpu'] / max(h1['cpu'], 0.01):.2f} of BUILD_ON=host | {h1['cpu']:.1f} |",
        f"| one-file change: bytes into the host | {mb(op2['host']['shipped_bytes'])} | {mb(sl2['bytes'])} | "
        f"{op2['host']['shipped_bytes'] / sl2['bytes']:.6f} | {mb(h2['host']['uploaded_bytes'])} (release files only) |",
        f"| one-file change: transfer seconds | {op2['host']['shipped_seconds']:.1f} | {sl2['wall']:.1f} | "
        f"{op2['host']['shipped_seconds'] / sl2['wall']:.3f} | - |",
        f"| one-file change: push (s) / layers pushed | {op2['build']['push_seconds']:.1f} / {op2['build']['layers_pushed']} | - | - | - |",
        f"| one-file change: deploy wall time (s) | {op2['wall']:.1f} | - | - | {h2['wall']:.1f} |",
        f"| one-file change: CPU seconds on the serving host | {op2['cpu']:.1f} | {sl2['cpu']:.1f} (transfer only) | "
        f"{op2['cpu'] / max(h2['cpu'], 0.01):.2f} of BUILD_ON=host | {h2['cpu']:.1f} |",
        "",
        "Bytes into the host: for BUILD_ON=operator, what crossed the host's reverse tunnel (HTTP included); for the "
        "baseline, the `docker save` stream. CPU on the serving host includes everything the deploy made it do "
        "(starting containers, migrations, probes), so the CPU rows compare whole deploys; the baseline's is the "
        "transfer alone. The host's first deploy ships every layer it never pulled from healthdeploy (its base "
        "image came by `docker load`, so its compressed digest is unknown to it); after that only changed layers.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
