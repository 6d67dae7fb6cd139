"""Day-two tasks: releases, audit, lock status, status, logs, exec, hosts.trust, the demo's endpoints."""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import urllib.request

from deploy.cli import Runtime, choose_hosts
from deploy.commands.base import cmd, script
from deploy.core.console import Console
from deploy.core.errors import EXIT_OK, ExitCode, HealthdeployError, UsageError
from deploy.core.services import ALL_SERVICES, APP_PORTS, GATEWAY_PORT_OF
from deploy.core.settings import Settings
from deploy.execute.session import Session
from deploy.execute.ssh import add_known_host, fingerprint
from deploy.facts.containers import Container
from deploy.facts.files import read_file
from deploy.facts.host import HostFacts, host_facts
from deploy.facts.lock import lock_status as lock_status_fact
from deploy.facts.lock import parse_lock


def _sessions(runtime: Runtime, cli_hosts: list[str]):
    for alias in choose_hosts(runtime.settings, cli_hosts):
        host = runtime.connect(alias)
        try:
            yield Session(host, runtime.settings, runtime.target(alias, host.address), runtime.console)
        finally:
            host.close()


def releases(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    if runtime.settings.swarm:
        from deploy.cli import swarm

        return swarm.releases(runtime, cli_hosts, as_json=as_json)
    rows = []
    for session in _sessions(runtime, cli_hosts):
        facts = HostFacts.parse(session.run(host_facts(session.t.deploy_path)).text)
        for release in facts.releases:
            rows.append({"host": session.alias, "release": release, "live": release == facts.current})
    if as_json:
        runtime.console.json({"releases": rows})
    else:
        runtime.console.table(["host", "release", "live"], [[r["host"], r["release"], "*" if r["live"] else ""] for r in rows])
    return EXIT_OK


def audit(runtime: Runtime, cli_hosts: list[str], lines: int = 20, as_json: bool = False) -> int:
    entries = []
    for session in _sessions(runtime, cli_hosts):
        text = session.run(read_file(f"{session.t.shared}/audit.log")).text
        for line in text.splitlines()[-lines:]:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    if as_json:
        runtime.console.json({"entries": entries})
    else:
        runtime.console.table(["ts", "host", "event", "release", "result", "who", "key", "seconds"],
                              [[e.get("ts"), e.get("host"), e.get("event"), e.get("release", ""), e.get("result", ""),
                                e.get("who"), e.get("key", ""), e.get("duration_s", "")] for e in entries])
    return EXIT_OK


def lock_status(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    rows = []
    for session in _sessions(runtime, cli_hosts):
        state = parse_lock(session.run(lock_status_fact(session.t.lock_dir)).text)
        rows.append({"host": session.alias, "state": state.state, **state.info})
    if as_json:
        runtime.console.json({"locks": rows})
    else:
        runtime.console.table(["host", "state", "operation", "who", "since", "release"],
                              [[r["host"], r["state"], r.get("operation", ""), r.get("who", ""), r.get("since", ""),
                                r.get("release", "")] for r in rows])
    return EXIT_OK


def parse_hop_fingerprints(text: str | None) -> dict[str, str]:
    """``--hop bastion=SHA256:...,jump2=SHA256:...`` -> {name: fingerprint}."""
    hops: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        if not sep or not name.strip() or not value.strip().startswith("SHA256:"):
            raise UsageError(f"--hop {entry.strip()!r} is not NAME=SHA256:...",
                             "name each jump host as ProxyJump writes it, e.g. --hop bastion=SHA256:abc...")
        hops[name.strip()] = value.strip()
    return hops


def trust_host(settings: Settings, alias: str, expected: str | None, yes: bool, console: Console,
               hop_fingerprints: dict[str, str] | None = None) -> int:
    """Show and record the key of each hop the connection to ``alias`` uses, in the order they are reached.

    Each hop's key is fetched the way a connection reaches it: a jump host through the hops before it (each
    verified against known_hosts, authenticated), never by connecting to its HostName directly. A hop already
    in known_hosts with the same key is only shown. A new key is recorded when it matches its fingerprint
    (``--fingerprint`` for ``alias`` itself, ``--hop NAME=SHA256:...`` for a jump host), with ``--yes``, or when
    confirmed at a terminal; a CHANGED key only with its fingerprint or at a terminal (never by ``--yes``)."""
    from deploy.execute.ssh import close_chain, connection_for, fetch_key_of, hops_of, known_key

    hop_fingerprints = dict(hop_fingerprints or {})
    final = connection_for(alias, settings.ssh_config, settings.ssh_known_hosts, settings.ssh_connect_timeout)
    chain = hops_of(final)
    names = {id(h): (h.hd_label.split(" ")[0], h.host) for h in chain}
    unused = set(hop_fingerprints) - {n for pair in names.values() for n in pair}
    if unused:
        jumps = ", ".join(names[id(h)][0] for h in chain[:-1]) or "none"
        raise UsageError(f"--hop names {', '.join(sorted(unused))}, not a jump host on the way to {alias}",
                         f"its jump hosts: {jumps}")
    try:
        for hop in chain:
            short, host = names[id(hop)]
            is_final = hop is final
            name, key = fetch_key_of(hop, settings.ssh_connect_timeout)
            shown = f"{key.get_name()} {fingerprint(key)}"
            what = alias if is_final else hop.hd_label
            console.result(f"{what} ({name}) presents {shown}")
            want = expected if is_final else (hop_fingerprints.get(short) or hop_fingerprints.get(host))
            old = known_key(hop, name, key.get_name())
            if want and want.strip() != fingerprint(key):
                raise HealthdeployError(f"fingerprint of {what} is {fingerprint(key)}, not {want}",
                                        "do not trust this host until you know why")
            if old is not None and old == key:
                console.result(f"{what}: already trusted")
                continue
            if old is not None and not want:
                console.warn(f"{what}: host key CHANGED (known_hosts has {fingerprint(old)})")
            if not want:
                flag = "--fingerprint" if is_final else f"--hop {short}=SHA256:..."
                if not (yes and old is None):
                    if not sys.stdin.isatty():
                        raise UsageError(f"not trusting {'the changed' if old is not None else 'the'} host key of {what} "
                                         f"({shown}) without confirmation",
                                         f"compare it out of band, then pass {flag}" + ("" if old is not None else " (or --yes)"))
                    answer = input(f"Trust {shown} for {what}? [y/N] ")
                    if answer.strip().lower() not in ("y", "yes"):
                        raise UsageError("not trusted", f"nothing was written for {what}")
            add_known_host(settings.ssh_known_hosts, name, key)
            for member in chain:  # the next hops are reached through this one, verified with its new key
                member.client.get_host_keys().add(name, key.get_name(), key)
            console.result(f"trusted: {name} added to {settings.ssh_known_hosts}")
    finally:
        close_chain(final)
    return EXIT_OK


def show_endpoints(runtime: Runtime, cli_hosts: list[str]) -> int:
    """After the demo deploy: each application endpoint through the gateway, probed from here."""
    rows = []
    failed = False
    for alias in choose_hosts(runtime.settings, cli_hosts):
        if not runtime.settings.role_of(alias).runs_app:
            continue
        address = runtime.target(alias).gateway_bind
        for service, port in GATEWAY_PORT_OF.items():
            # A frontend's /health is nginx's plain "ok": its page is what a user gets, and names its build.
            url = f"http://{address}:{port}{'/' if APP_PORTS[service] == 80 else '/health'}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    rows.append([alias, service, url, response.status, build_of(response.read())])
            except Exception as exc:  # report every endpoint, then fail
                failed = True
                rows.append([alias, service, url, f"error: {exc}", ""])
    runtime.console.table(["host", "service", "url", "status", "build"], rows)
    return ExitCode.UNHEALTHY if failed else EXIT_OK


_BUILD_META = re.compile(rb'<meta\s+name="healthdeploy-build"\s+content="([^"]*)"')


def build_of(body: bytes) -> str:
    """The build an endpoint names: ``build`` of a JSON answer, or a page's healthdeploy-build meta tag."""
    try:
        data = json.loads(body)
    except ValueError:
        found = _BUILD_META.search(body)
        return found.group(1).decode(errors="replace") if found else ""
    return str(data.get("build", "")) if isinstance(data, dict) else ""


def _age(started: str) -> str:
    try:
        when = _dt.datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return "-"
    seconds = int((_dt.datetime.now(_dt.timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status(runtime: Runtime, cli_hosts: list[str], as_json: bool = False) -> int:
    """Release, uptime and health of every service on every host, by role, in one screen."""
    if runtime.settings.swarm:
        from deploy.cli import swarm

        return swarm.status(runtime, cli_hosts, as_json=as_json)
    rows, data = [], []
    for session in _sessions(runtime, cli_hosts):
        facts = HostFacts.parse(session.run(host_facts(session.t.deploy_path)).text)
        role = session.t.role.value
        for c in session.containers():
            entry = {"host": session.alias, "role": role, "release": facts.current, "service": c.service,
                     "container": c.name, "state": c.state, "health": c.health,
                     "uptime": _age(c.started) if c.running else "-", "restarts": c.restart_count, "image": c.image_ref}
            data.append(entry)
            rows.append([session.alias, role, facts.current or "-", c.service, c.state, c.health or "-", entry["uptime"],
                         c.restart_count, c.image_ref.rsplit("/", 1)[-1]])
    if as_json:
        runtime.console.json({"services": data})
    else:
        runtime.console.table(["host", "role", "release", "service", "state", "health", "uptime", "restarts", "image"], rows)
    return EXIT_OK


def _service_containers(session: Session, service: str) -> list[Container]:
    if service not in ALL_SERVICES:
        raise UsageError(f"unknown service {service!r}", f"one of {', '.join(ALL_SERVICES)}")
    found = [c for c in session.containers() if c.service == service and c.running]
    if not found:
        raise HealthdeployError(f"{session.alias}: no running {service} container", "see `fab status`")
    return found


def _services_here(runtime: Runtime, cli_hosts: list[str], service: str) -> list[str]:
    if service not in ALL_SERVICES:
        raise UsageError(f"unknown service {service!r}", f"one of {', '.join(ALL_SERVICES)}")
    from deploy.core.services import services_of

    s = runtime.settings
    hosts = [h for h in choose_hosts(s, cli_hosts) if service in services_of(s.role_of(h), s.enabled_infra)]
    if not hosts:
        raise UsageError(f"no host of env '{s.env_name}' runs {service}", "see `fab status`")
    return hosts


def logs(runtime: Runtime, cli_hosts: list[str], service: str, tail: int = 100, follow: bool = False) -> int:
    if runtime.settings.swarm:
        from deploy.cli import swarm

        return swarm.logs(runtime, cli_hosts, service, tail=tail, follow=follow)
    for session in _sessions(runtime, _services_here(runtime, cli_hosts, service)):
        for container in _service_containers(session, service):
            argv = ["docker", "logs", "--tail", str(tail), "--timestamps"] + (["--follow"] if follow else [])
            session.run(cmd(*argv, container.name, description=f"logs of {container.name}", readonly=True),
                        timeout=10 ** 9 if follow else None,
                        on_line=lambda line, a=session.alias, n=container.name: runtime.console.result(f"[{a} {n}] {line}"))
    return EXIT_OK


# `fab exec SERVICE -- WORDS...`: the words are taken exactly as the operator's shell split them (Fabric's
# remainder joins them with spaces and loses the quoting) and passed to `docker exec` as separate argv
# words, never through the host's shell, so quoted arguments survive and nothing is interpreted twice.
EXEC = 'c="$1"; shift; exec docker exec "$c" "$@"'


def exec_in_service(runtime: Runtime, cli_hosts: list[str], service: str, words: list[str]) -> int:
    """Run ``words`` in the service's first running container on each host.

    Exit code: 0 when it succeeded everywhere, else 100 + the first non-zero remote status (capped at 255),
    so a remote 5 never reads as healthdeploy's "rolled back"; the remote status is printed too."""
    if runtime.settings.swarm:
        from deploy.cli import swarm

        return swarm.exec_in_service(runtime, cli_hosts, service, words)
    if not words:
        raise UsageError("no command given", "fab -H HOST exec SERVICE -- COMMAND [ARGS...]")
    worst = 0
    for session in _sessions(runtime, _services_here(runtime, cli_hosts, service)):
        container = _service_containers(session, service)[0]
        result = session.run(script(EXEC, container.name, *words, description=f"exec in {container.name}",
                                    readonly=True), check=False,
                             on_line=lambda line, a=session.alias: runtime.console.result(f"[{a}] {line}"))
        if result.exit_status:
            code = min(255, ExitCode.REMOTE_BASE + result.exit_status)
            print(f"error: {session.alias}: the command exited with status {result.exit_status} (fab exec exits "
                  f"{int(ExitCode.REMOTE_BASE)}+N: {code})", file=sys.stderr)
            worst = worst or result.exit_status
    return min(255, ExitCode.REMOTE_BASE + worst) if worst else EXIT_OK
