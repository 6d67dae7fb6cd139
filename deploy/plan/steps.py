"""Plan steps: what a plan says it will do, each with its reason. Shared by deploy, rollback and restore.

A plan is a list of ``Step``s in the order ``apply`` runs them. The dry run prints exactly this list; the
apply reports, for each step, whether it ran or (for a conditional step) why it was skipped, so a test can
hold the two side by side.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StepKind(str, enum.Enum):
    NEW_RELEASE = "new-release"  # releases/<id> as a host-local copy of the live release
    EXPORT_SOURCE = "export-source"  # git archive of the commit into src/
    SEND_FILES = "send-files"  # the files whose SHA-256 changed, as one checksummed tar
    REMOVE_FILES = "remove-files"
    WRITE_RELEASE = "write-release"  # release.env + MANIFEST
    STAGE_SECRETS = "stage-secrets"  # a new secrets version under shared/env/.versions
    VALIDATE = "validate"  # compose config, nginx -t of the new gateway config with the staged TLS files
    BUILD = "build"  # target: where ("host", "operator" or a build host); off the host it runs once per deploy
    SHIP = "ship"  # images built off the host into this host: only the layers it lacks (target: where they were built)
    TAG = "tag"  # unchanged source: the live image gets the new release's tag, no build
    ROTATE_PREPARE = "rotate-prepare"  # a server accepts the new credential beside the old one
    INSTALL_SECRETS = "install-secrets"
    INSTALL_GATEWAY_CONF = "install-gateway-conf"
    START = "start"  # a service that is not running (never recreated)
    RECREATE = "recreate"  # a changed definition or credentials read at start (stop first: one copy per volume)
    RESTART = "restart"
    ROTATE = "rotate"  # the server's credential changed in place (ALTER ROLE, ...)
    RELOAD_GATEWAY = "reload-gateway"
    MIGRATE = "migrate"
    REMOVE_ORPHANS = "remove-orphans"
    ROLL = "roll"  # zero-downtime: new containers beside the old, gateway switch, drain, old removed
    REPAIR_UPSTREAMS = "repair-upstreams"
    ROTATE_FINISH = "rotate-finish"  # the old credential is refused from now on
    SWITCH = "switch"  # `current` -> the release
    RECORD = "record"  # state.json: which release is live, with which secrets version
    PRUNE = "prune"
    # TARGET=swarm (plan/swarm.py)
    LABEL_NODES = "label-nodes"  # healthdeploy.data/app/edge node labels as SWARM_NODES says
    REGISTRY_LOGIN = "registry-login"  # docker login --password-stdin on the manager
    PULL = "pull"  # an image the stack file needs the entrypoint and command of, absent on the manager
    CREATE_SECRETS = "create-secrets"  # a Swarm secret per service secret half, named by its content
    CREATE_CONFIGS = "create-configs"  # healthdeploy's task entrypoint and gateway sync
    DEPLOY_DATA = "deploy-data"  # the data layer first (stop-first, pinned), waited for
    DEPLOY_STACK = "deploy-stack"  # docker stack deploy, then wait until every changed service converged
    VERIFY = "verify"  # every edge gateway lists the healthy tasks and answers through each port
    REBALANCE = "rebalance"  # a stateless service's tasks crowded on fewer app nodes than it could use


@dataclass(frozen=True)
class Step:
    kind: StepKind
    target: str = ""  # a service, a release id, a secrets version
    reason: str = ""
    items: tuple[str, ...] = ()  # files, services or containers the step acts on
    # Non-empty: the step runs only if this holds when apply reaches it (e.g. "image-changed:backend").
    condition: str = ""
    # "after-apps": on a data host, run after every application host has rolled; "in-roll:<svc>": inside that
    # service's roll, after its new containers are healthy and before the gateway switches to them.
    phase: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.target}" if self.target else self.kind.value

    def describe(self) -> str:
        what = VERBS.get(self.kind, self.kind.value.replace("-", " "))
        text = f"{what} {self.target}".strip()
        if self.items:
            shown = ", ".join(self.items[:8]) + (f" (+{len(self.items) - 8} more)" if len(self.items) > 8 else "")
            text += f": {shown}"
        if self.reason:
            text += f" ({self.reason})"
        if self.condition:
            text += f" [only {condition_text(self.condition)}]"
        if self.phase.startswith("in-roll:"):
            text += f" [during the roll of {self.phase[8:]}, just before the switch]"
        elif self.phase == "after-apps":
            text += " [after every application host has rolled]"
        return text

    def to_json(self) -> dict:
        out = {"step": self.kind.value, "target": self.target, "reason": self.reason}
        if self.items:
            out["items"] = list(self.items)
        if self.condition:
            out["condition"] = self.condition
        if self.phase:
            out["phase"] = self.phase
        return out


VERBS = {
    StepKind.NEW_RELEASE: "create release", StepKind.EXPORT_SOURCE: "export git commit",
    StepKind.SEND_FILES: "send files", StepKind.REMOVE_FILES: "remove files", StepKind.WRITE_RELEASE: "write release files of",
    StepKind.STAGE_SECRETS: "stage secrets version", StepKind.VALIDATE: "validate release", StepKind.BUILD: "build images on",
    StepKind.SHIP: "ship images built on",
    StepKind.TAG: "tag live images for", StepKind.ROTATE_PREPARE: "let accept the new password:",
    StepKind.INSTALL_SECRETS: "install secrets version", StepKind.INSTALL_GATEWAY_CONF: "install the gateway config",
    StepKind.START: "start", StepKind.RECREATE: "recreate", StepKind.RESTART: "restart",
    StepKind.ROTATE: "change the password on", StepKind.RELOAD_GATEWAY: "reload", StepKind.MIGRATE: "migrate with",
    StepKind.REMOVE_ORPHANS: "remove stray containers of", StepKind.ROLL: "roll", StepKind.REPAIR_UPSTREAMS: "repair upstreams",
    StepKind.ROTATE_FINISH: "refuse the old password on", StepKind.SWITCH: "switch current to",
    StepKind.RECORD: "record live release", StepKind.PRUNE: "prune old releases",
    StepKind.LABEL_NODES: "label nodes", StepKind.REGISTRY_LOGIN: "log in to registry", StepKind.PULL: "pull",
    StepKind.CREATE_SECRETS: "create Swarm secrets", StepKind.CREATE_CONFIGS: "create Swarm configs",
    StepKind.DEPLOY_DATA: "deploy the data layer of", StepKind.DEPLOY_STACK: "deploy stack",
    StepKind.VERIFY: "verify through the gateways of", StepKind.REBALANCE: "spread the tasks of",
}


def condition_text(condition: str) -> str:
    kind, _, arg = condition.partition(":")
    if kind == "image-changed":
        return f"if the {arg} image changed"
    return condition


@dataclass
class Applied:
    """What apply did: the key of every step, in order, with ``ran`` or ``skipped: why``."""

    done: list[tuple[str, str]] = field(default_factory=list)

    def ran(self, step: Step) -> None:
        self.done.append((step.key, "ran"))

    def skipped(self, step: Step, why: str) -> None:
        self.done.append((step.key, f"skipped: {why}"))

    def keys(self, only_ran: bool = False) -> list[str]:
        return [k for k, outcome in self.done if not only_ran or outcome == "ran"]
