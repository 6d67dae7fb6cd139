"""The release checklist: named checks with parameters from a TOML file the team edits.

Each check is computed from facts first (status), then the table/JSON/JUnit is printed; nothing is
changed. ``env/checklist.toml`` applies to every environment; ``env/<name>.checklist.toml``, when it
exists, replaces it for that environment.
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from deploy.core.errors import UsageError
from deploy.facts.containers import Container
from deploy.facts.host import HostFacts, version_tuple
from deploy.core.settings import KEYS_BY_NAME, KNOWN_DEFAULT_SECRETS, SCHEMA, Settings


@dataclass
class Item:
    name: str
    kind: str
    params: dict[str, Any]
    severity: str = "fail"  # what a failed check counts as: fail or warn


@dataclass
class Outcome:
    name: str
    kind: str
    status: str  # pass | warn | fail
    reason: str
    hint: str = ""


@dataclass
class Facts:
    """Everything the checks look at, gathered before any check runs."""

    settings: Settings
    now: dt.datetime
    hosts: dict[str, HostFacts] = field(default_factory=dict)
    containers: dict[str, list[Container]] = field(default_factory=dict)
    log_configs: dict[str, dict[str, dict]] = field(default_factory=dict)  # host -> container -> LogConfig
    healthy: dict[str, bool] = field(default_factory=dict)
    host_errors: dict[str, str] = field(default_factory=dict)
    backups_dir: Path = Path("backups")


def load_items(path: Path) -> list[Item]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read checklist {path}: {exc.strerror or exc}",
                         "check --file (default: env/NAME.checklist.toml, else env/checklist.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot read checklist {path}: {exc}", "fix the TOML syntax") from None
    items = []
    for index, raw in enumerate(data.get("check", []), 1):
        raw = dict(raw)
        kind = raw.pop("kind", None)
        if kind not in CHECKS:
            raise UsageError(f"{path}: check #{index} has unknown kind {kind!r}", f"known: {', '.join(sorted(CHECKS))}")
        name = raw.pop("name", kind)
        severity = raw.pop("severity", "fail")
        if severity not in ("fail", "warn"):
            raise UsageError(f"{path}: check {name!r}: severity must be fail or warn", f"got {severity!r}")
        items.append(Item(name, kind, raw, severity))
    return items


def checklist_path(env_dir: Path, env_name: str) -> Path:
    specific = env_dir / f"{env_name}.checklist.toml"
    return specific if specific.exists() else env_dir / "checklist.toml"


def _remote(facts: Facts, name: str, kind: str, test: Callable[[str, HostFacts], str | None], hint: str) -> Outcome:
    problems = [f"{h}: {e}" for h, e in facts.host_errors.items()]
    for host, hf in facts.hosts.items():
        problem = test(host, hf)
        if problem:
            problems.append(f"{host}: {problem}")
    if problems:
        return Outcome(name, kind, "fail", "; ".join(problems), hint)
    return Outcome(name, kind, "pass", f"ok on {', '.join(facts.hosts) or 'no host'}")


# -- the checks ------------------------------------------------------------------------------------
def check_secrets(facts: Facts, item: Item) -> Outcome:
    min_length = int(item.params.get("min_length", 16))
    weak = []
    for key in SCHEMA:
        if key.kind != "secret" or (key.service and key.service in facts.settings.disabled_services):
            continue
        if key.name == "INFLUX_TOKEN" and facts.settings.influx_version == "1":
            continue
        value = getattr(facts.settings, key.attr).reveal()
        if not value:
            continue  # missing ones are required_keys' business
        if value.lower() in KNOWN_DEFAULT_SECRETS:
            weak.append(f"{key.name} is an example value from the deployment report")
        elif len(value) < min_length:
            weak.append(f"{key.name} is shorter than {min_length} characters")
        elif len(set(value)) < 6:
            weak.append(f"{key.name} has fewer than 6 distinct characters")
    if weak:
        return Outcome(item.name, item.kind, "fail", "; ".join(weak), "generate each with `openssl rand -base64 32`")
    return Outcome(item.name, item.kind, "pass", f"no default or weak secret (min length {min_length})")


def check_required_keys(facts: Facts, item: Item) -> Outcome:
    keys = item.params.get("keys", [])
    unknown = [k for k in keys if k not in KEYS_BY_NAME]
    if unknown:
        return Outcome(item.name, item.kind, "fail", f"unknown keys in the checklist: {', '.join(unknown)}",
                       "fix the checklist file")
    missing = [k for k in keys if not getattr(facts.settings, KEYS_BY_NAME[k].attr)]
    if missing:
        return Outcome(item.name, item.kind, "fail", f"not set: {', '.join(missing)}",
                       f"set them in {facts.settings.source}")
    return Outcome(item.name, item.kind, "pass", f"all set: {', '.join(keys)}")


def check_tls(facts: Facts, item: Item) -> Outcome:
    from cryptography import x509

    days = int(item.params.get("days", 21))
    s = facts.settings
    if not s.tls_cert_file:
        status = "fail" if item.params.get("required", True) else "warn"
        return Outcome(item.name, item.kind, status, "no TLS certificate configured (TLS_CERT_FILE)",
                       "set TLS_CERT_FILE and TLS_KEY_FILE")
    try:
        certs = x509.load_pem_x509_certificates(Path(s.tls_cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        return Outcome(item.name, item.kind, "fail", f"cannot read {s.tls_cert_file}: {exc}", "give a PEM chain")
    leaf = certs[0]
    expires = leaf.not_valid_after_utc
    left = expires - facts.now
    if left.total_seconds() <= 0:
        return Outcome(item.name, item.kind, "fail", f"certificate expired on {expires:%Y-%m-%d}", "renew it")
    if left < dt.timedelta(days=days):
        return Outcome(item.name, item.kind, "fail", f"certificate expires in {left.days} day(s) ({expires:%Y-%m-%d}), "
                       f"less than {days}", "renew it")
    names = set()
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = {a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)}
    wanted = [n for n in s.server_names if n != "_"]
    uncovered = [n for n in wanted if not any(n == c or (c.startswith("*.") and n.endswith(c[1:]) and
                                                         n.count(".") == c.count(".")) for c in names)]
    if uncovered:
        return Outcome(item.name, item.kind, "fail", f"certificate does not cover {', '.join(uncovered)} "
                       f"(it covers {', '.join(sorted(names)) or 'nothing'})", "issue one for SERVER_NAMES")
    return Outcome(item.name, item.kind, "pass", f"valid until {expires:%Y-%m-%d} for {', '.join(wanted) or 'any name'}")


def check_log_rotation(facts: Facts, item: Item) -> Outcome:
    problems = []
    for host, configs in facts.log_configs.items():
        for name, config in configs.items():
            opts = config.get("Config") or {}
            if config.get("Type") == "json-file" and not opts.get("max-size"):
                problems.append(f"{host}: {name} logs without max-size")
    problems += [f"{h}: {e}" for h, e in facts.host_errors.items()]
    if problems:
        return Outcome(item.name, item.kind, "fail", "; ".join(problems[:5]), "deploy the stack (the compose file sets rotation)")
    if not any(facts.log_configs.values()):
        return Outcome(item.name, item.kind, "fail", "no container to check", "deploy first")
    return Outcome(item.name, item.kind, "pass", "every container rotates its logs")


def check_disk(facts: Facts, item: Item) -> Outcome:
    min_mb = int(item.params.get("min_mb", facts.settings.min_free_disk_mb))
    return _remote(facts, item.name, item.kind,
                   lambda h, f: None if f.free_mb >= min_mb else f"{f.free_mb} MB free, need {min_mb}", "free disk space")


def check_docker(facts: Facts, item: Item) -> Outcome:
    minimum = str(item.params.get("min", "20.10"))
    return _remote(facts, item.name, item.kind,
                   lambda h, f: None if f.docker and version_tuple(f.docker) >= version_tuple(minimum)
                   else f"Docker {f.docker or 'missing'} < {minimum}", "upgrade Docker")


def check_compose(facts: Facts, item: Item) -> Outcome:
    minimum = str(item.params.get("min", "2.20"))
    return _remote(facts, item.name, item.kind,
                   lambda h, f: None if f.compose and version_tuple(f.compose) >= version_tuple(minimum)
                   else f"Compose {f.compose or 'missing'} < {minimum}", "install Compose v2")


def newest_verified_backup(backups_dir: Path, env_name: str) -> tuple[str, dt.datetime] | None:
    best = None
    root = backups_dir / env_name
    for manifest in root.glob("*/manifest.json") if root.is_dir() else []:
        try:
            data = json.loads(manifest.read_text())
            finished = dt.datetime.fromisoformat(data["finished"].replace("Z", "+00:00"))
        except (OSError, ValueError, KeyError):
            continue
        verify = manifest.parent / "verify.json"
        try:
            verified = json.loads(verify.read_text()).get("result") == "ok"
        except (OSError, ValueError):
            verified = False
        if verified and (best is None or finished > best[1]):
            best = (manifest.parent.name, finished)
    return best


def check_backup_age(facts: Facts, item: Item) -> Outcome:
    max_hours = float(item.params.get("max_hours", 26))
    newest = newest_verified_backup(facts.backups_dir, facts.settings.env_name)
    if newest is None:
        return Outcome(item.name, item.kind, "fail", f"no verified backup in {facts.backups_dir / facts.settings.env_name}",
                       f"inv backup --env {facts.settings.env_name} && inv backup.verify")
    age = (facts.now - newest[1]).total_seconds() / 3600
    if age > max_hours:
        return Outcome(item.name, item.kind, "fail", f"newest verified backup {newest[0]} is {age:.0f} h old "
                       f"(limit {max_hours:.0f} h)", f"inv backup --env {facts.settings.env_name}")
    return Outcome(item.name, item.kind, "pass", f"newest verified backup {newest[0]} is {age:.1f} h old")


def check_backup_protection(facts: Facts, item: Item) -> Outcome:
    """Backups hold patient data: encrypted at rest (BACKUP_AGE_RECIPIENTS) and signed (BACKUP_SIGNING_KEY with
    BACKUP_ALLOWED_SIGNERS, so a restore can refuse a set it cannot trust). Fails on production; a warning
    elsewhere (``production_only = false`` makes it fail everywhere)."""
    s = facts.settings
    missing = []
    if not s.backup_age_recipients:
        missing.append("backups are not encrypted at rest (BACKUP_AGE_RECIPIENTS is empty)")
    if not s.backup_signing_key:
        missing.append("backups are not signed (BACKUP_SIGNING_KEY is empty)")
    if not s.backup_allowed_signers:
        missing.append("restores cannot check who made a set (BACKUP_ALLOWED_SIGNERS is empty)")
    if not missing:
        return Outcome(item.name, item.kind, "pass", "backups encrypted with age and signed; restores check the signer")
    strict = s.env_kind == "production" or not item.params.get("production_only", True)
    return Outcome(item.name, item.kind, "fail" if strict else "warn", "; ".join(missing),
                   "`inv backup.keygen --out FILE` (age) and `inv backup.keygen --signing --out FILE`, then set the "
                   f"keys in {s.source}")


def check_services_healthy(facts: Facts, item: Item) -> Outcome:
    bad = [h for h, ok in facts.healthy.items() if not ok] + list(facts.host_errors)
    if bad:
        return Outcome(item.name, item.kind, "fail", f"unhealthy on {', '.join(sorted(set(bad)))}",
                       "`fab health` shows which check fails")
    return Outcome(item.name, item.kind, "pass", f"healthy on {', '.join(facts.healthy)}")


def check_same_release(facts: Facts, item: Item) -> Outcome:
    releases = {h: f.current or "(none)" for h, f in facts.hosts.items()}
    if facts.host_errors:
        return Outcome(item.name, item.kind, "fail", "; ".join(f"{h}: {e}" for h, e in facts.host_errors.items()))
    if len(set(releases.values())) > 1 or "(none)" in releases.values():
        return Outcome(item.name, item.kind, "fail", ", ".join(f"{h}={r}" for h, r in releases.items()),
                       "deploy every host to the same release")
    return Outcome(item.name, item.kind, "pass", f"{next(iter(releases.values()), '-')} on every host")


CHECKS: dict[str, Callable[[Facts, Item], Outcome]] = {
    "secrets_not_default": check_secrets, "required_keys": check_required_keys, "tls_certificate": check_tls,
    "log_rotation": check_log_rotation, "disk_free": check_disk, "docker_version": check_docker,
    "compose_version": check_compose, "backup_age": check_backup_age, "backup_protection": check_backup_protection,
    "services_healthy": check_services_healthy,
    "same_release": check_same_release,
}
REMOTE_KINDS = {"log_rotation", "disk_free", "docker_version", "compose_version", "services_healthy", "same_release"}


def evaluate(facts: Facts, items: list[Item]) -> list[Outcome]:
    outcomes = []
    for item in items:
        outcome = CHECKS[item.kind](facts, item)
        if outcome.status == "fail" and item.severity == "warn":
            outcome.status = "warn"
        outcomes.append(outcome)
    return outcomes


def to_json(env: str, outcomes: list[Outcome]) -> dict:
    return {"schema": 1, "env": env, "passed": all(o.status != "fail" for o in outcomes),
            "counts": {s: sum(o.status == s for o in outcomes) for s in ("pass", "warn", "fail")},
            "checks": [asdict(o) for o in outcomes]}


def to_junit(env: str, outcomes: list[Outcome]) -> bytes:
    suite = ET.Element("testsuite", name=f"healthdeploy.checklist.{env}", tests=str(len(outcomes)),
                       failures=str(sum(o.status == "fail" for o in outcomes)),
                       skipped=str(sum(o.status == "warn" for o in outcomes)))
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"checklist.{env}.{o.kind}", name=o.name)
        if o.status == "fail":
            ET.SubElement(case, "failure", message=o.reason).text = o.hint
        elif o.status == "warn":
            ET.SubElement(case, "skipped", message=f"warning: {o.reason}")
        ET.SubElement(case, "system-out").text = o.reason
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)
