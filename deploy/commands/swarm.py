"""Docker Swarm command builders (argv only; see ``commands.base`` for the quoting rules).

Secrets never appear here as words: ``docker secret create NAME -`` and ``docker login --password-stdin``
read them from stdin (``Command.stdin``), which is never printed.
"""

from __future__ import annotations

from .base import Command, cmd, script

BUILD_TIMEOUT = 3600
PUSH_TIMEOUT = 1800
DEPLOY_TIMEOUT = 300


def node_update_labels(node: str, add: dict[str, str], remove: tuple[str, ...]) -> Command:
    words: list[str] = []
    for key, value in sorted(add.items()):
        words += ["--label-add", f"{key}={value}"]
    for key in sorted(remove):
        words += ["--label-rm", key]
    return cmd("docker", "node", "update", *words, node, description=f"label node {node}",
               intent=("node-labels", node, tuple(sorted(add)), tuple(sorted(remove))))


def _docker(config_dir: str) -> tuple[str, ...]:
    """``docker`` with healthdeploy's own client config (registry credentials of this environment only, in a
    0700 directory on the manager) instead of the user's ~/.docker, when a login is used."""
    return ("docker", "--config", config_dir) if config_dir else ("docker",)


def registry_login(registry: str, user: str, password: bytes, config_dir: str) -> Command:
    """``docker login --password-stdin``: the password is stdin, never a word of the command line."""
    host = registry.split("/", 1)[0]
    return script('set -e; umask 077; mkdir -p "$1"; chmod 0700 "$1"; shift; exec "$@"', config_dir,
                  *_docker(config_dir), "login", "--username", user, "--password-stdin", host,
                  description=f"log in to {host}", stdin=password, intent=("registry-login", host))


def registry_logout(registry: str, config_dir: str) -> Command:
    host = registry.split("/", 1)[0]
    return cmd(*_docker(config_dir), "logout", host, description=f"log out of {host}", intent=("registry-logout", host))


def build_image(tag: str, context: str, build_args: dict[str, str] | None = None, network_none: bool = False) -> Command:
    words = ["docker", "build", "--quiet", "--tag", tag]
    if network_none:
        words += ["--network", "none"]
    for key, value in sorted((build_args or {}).items()):
        words += ["--build-arg", f"{key}={value}"]
    return cmd(*words, context, description=f"build {tag}", intent=("build-image", tag), timeout=BUILD_TIMEOUT)


# Push, then print the digest the registry serves it under (its RepoDigests entry of this repository) and the
# image's config (its entrypoint and command, which the stack file runs through healthdeploy's entrypoint).
PUSH = r"""set -e
tag="$1"; shift
"$@" push --quiet "$tag" >/dev/null
repo="${tag%:*}"
docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$tag" | grep -F "$repo@" | head -n 1
docker image inspect "$tag"
"""


def push_image(tag: str, config_dir: str = "") -> Command:
    return script(PUSH, tag, *_docker(config_dir), description=f"push {tag}", intent=("push", tag), timeout=PUSH_TIMEOUT)


def pull_image(ref: str, config_dir: str = "") -> Command:
    return cmd(*_docker(config_dir), "pull", "--quiet", ref, description=f"pull {ref}", intent=("pull", ref),
               timeout=PUSH_TIMEOUT)


def image_configs(refs: tuple[str, ...]) -> Command:
    """JSON of ``docker image inspect`` for the images present (entrypoint and command of each)."""
    return script('docker image inspect "$@" 2>/dev/null || true', *refs, description="read image configs",
                  readonly=True, intent=("image-configs", *refs))


def secret_create(name: str, data: bytes, stack: str, service: str) -> Command:
    """``docker secret create NAME -``: the value is stdin."""
    return cmd("docker", "secret", "create", "--label", f"com.docker.stack.namespace={stack}",
               "--label", f"healthdeploy.service={service}", name, "-", description=f"create secret {name}",
               stdin=data, intent=("secret-create", name))


def config_create(name: str, data: bytes, stack: str) -> Command:
    return cmd("docker", "config", "create", "--label", f"com.docker.stack.namespace={stack}", name, "-",
               description=f"create config {name}", stdin=data, intent=("config-create", name))


def remove_secrets(names: tuple[str, ...]) -> Command:
    # A secret still used by a service is refused by Docker: that is what we want (never fail on it).
    return script('for n in "$@"; do docker secret rm "$n" >/dev/null 2>&1; done; exit 0', *names,
                  description="remove unused secrets", intent=("secret-rm", *names))


def remove_configs(names: tuple[str, ...]) -> Command:
    return script('for n in "$@"; do docker config rm "$n" >/dev/null 2>&1; done; exit 0', *names,
                  description="remove unused configs", intent=("config-rm", *names))


UNPACK_AND_CHECK = 'set -e; tar -x -m -f - -C "$1" --no-same-owner; docker stack config --compose-file "$1/$2" >/dev/null'


def unpack_and_check(directory: str, stack_file: str) -> Command:
    """The stack files arriving as a tar on stdin, then `docker stack config` of the stack file: one round trip."""
    return script(UNPACK_AND_CHECK, directory, stack_file, description="write and validate the stack file",
                  intent=("stack-files", directory))


def stack_config_check(stack_file: str) -> Command:
    return cmd("docker", "stack", "config", "--compose-file", stack_file, description="validate the stack file",
               readonly=True, intent=("stack-config",))


def stack_deploy(stack: str, stack_file: str, config_dir: str = "") -> Command:
    """Images are deployed exactly as the file names them (by digest); no registry query per tag. With a login
    its credentials go to the nodes with the services (--with-registry-auth)."""
    words = [*_docker(config_dir), "stack", "deploy", "--detach=true", "--resolve-image", "never"]
    if config_dir:
        words.append("--with-registry-auth")
    return cmd(*words, "--compose-file", stack_file, stack, description=f"deploy stack {stack}",
               intent=("stack-deploy", stack, stack_file), timeout=DEPLOY_TIMEOUT)


def service_rollback(service: str) -> Command:
    return cmd("docker", "service", "rollback", "--detach", service, description=f"roll back {service}",
               intent=("service-rollback", service))


def service_remove(services: tuple[str, ...]) -> Command:
    return cmd("docker", "service", "rm", *services, description=f"remove {', '.join(services)}",
               intent=("service-rm", *services))


def service_scale(pairs: tuple[tuple[str, int], ...], description: str = "scale services") -> Command:
    return cmd("docker", "service", "scale", "--detach", *[f"{s}={n}" for s, n in pairs],
               description=description, intent=("service-scale", *pairs))


def scale_writers(stack: str, replicas: dict[str, int], description: str) -> Command:
    """The stack's writers (service -> replica count) scaled in one call: to 0 for a restore, and back to the
    counts they had (its undo, which the restore guard also runs on the manager if we vanish)."""
    return service_scale(tuple((f"{stack}_{service}", int(n)) for service, n in sorted(replicas.items())),
                         description)


def service_logs(service: str, tail: int = 30, follow: bool = False, timestamps: bool = False) -> Command:
    words = ["docker", "service", "logs", "--raw", "--no-trunc", "--tail", str(tail)]
    if follow:
        words.append("--follow")
    if timestamps:
        words.append("--timestamps")
    return cmd(*words, service, description=f"logs of {service}", readonly=True, intent=("service-logs", service))


# The job's shell: its secrets file loaded, then a wait (at most $HEALTHDEPLOY_NAMES_WAIT s) until the data
# services' names resolve on its node, then the command. Swarm's DNS on a node learns another node's tasks by
# gossip, some time after they are healthy there: seen here, on a loaded test bed, a first deploy's migration
# failed for 65 s with "could not translate host name "postgres"" on the app node while PostgreSQL was healthy
# on the data node. A real migration tool fails at once on that; waiting for the names costs nothing otherwise.
# Without getent in the image the wait is skipped.
JOB_SHELL = r"""set -a && . "$HEALTHDEPLOY_ENV_FILE" && set +a
if command -v getent >/dev/null 2>&1; then
  started=$(date +%s); end=$((started + ${HEALTHDEPLOY_NAMES_WAIT:-120}))
  for name in $HEALTHDEPLOY_NAMES; do
    until getent hosts "$name" >/dev/null 2>&1; do
      [ "$(date +%s)" -lt "$end" ] || { echo "healthdeploy: $name does not resolve on this node; running anyway" >&2; break 2; }
      sleep 1
    done
  done
  waited=$(($(date +%s) - started))
  [ "$waited" -lt 2 ] || echo "healthdeploy: waited ${waited}s for this node to resolve $HEALTHDEPLOY_NAMES" >&2
fi
exec sh -c "$0"
"""


def job_create(name: str, stack: str, network: str, image: str, secret: str, uid: str, shell_command: str,
               environment: tuple[str, ...], constraint: str, names: tuple[str, ...] = ()) -> Command:
    """A one-off task on the stack's overlay network (a replicated job: it runs once, is never restarted)
    with the service's secret mounted like the service's own; ``--detach`` so its end is polled. No health
    check: the image's probes a server the job never starts, and Swarm kills an unhealthy task (exit 137) —
    any migration longer than the probe's start period and retries (seconds, on a busy host) would die."""
    words = ["docker", "service", "create", "--detach", "--name", name, "--mode", "replicated-job",
             "--restart-condition", "none", "--no-healthcheck", "--network", network, "--label", f"com.docker.stack.namespace={stack}",
             "--label", "healthdeploy.role=migrate", "--constraint", constraint,
             "--secret", f"source={secret},target=/run/healthdeploy/secrets.env,uid={uid},gid={uid},mode=0400",
             "--env", "HEALTHDEPLOY_ENV_FILE=/run/healthdeploy/secrets.env"]
    if names:
        words += ["--env", "HEALTHDEPLOY_NAMES=" + " ".join(names)]
    for assignment in environment:  # release settings only, never a secret
        words += ["--env", assignment]
    words += ["--entrypoint", "/bin/sh", image, "-c", JOB_SHELL, shell_command]
    return cmd(*words, description=f"start one-off task {name}", intent=("job-create", name))


def docker_exec(container: str, *argv: str, description: str, readonly: bool = False) -> Command:
    return cmd("docker", "exec", container, *argv, description=description, readonly=readonly,
               intent=("exec", container, *argv))


# `fab exec` on a node: the words reach `docker exec` as separate argv words, never a shell.
EXEC = 'c="$1"; shift; exec docker exec "$c" "$@"'


def exec_words(container: str, words: list[str]) -> Command:
    return script(EXEC, container, *words, description=f"exec in {container}", readonly=True)


# Undo of a deploy's stack changes, run on the manager (from the journal, by us or by the lock's holder).
# $1 stack, $2 the previous release's stack file ("" on a first deploy), $3 docker config dir or "", then the
# services it created, "--", the services it changed.
STACK_BACK = r"""stack="$1"; previous="$2"; config="$3"; shift 3
created=""; while [ $# -gt 0 ] && [ "$1" != -- ]; do created="$created ${stack}_$1"; shift; done
[ "${1:-}" = -- ] && shift
if [ -n "$config" ]; then docker="docker --config $config"; auth=--with-registry-auth; else docker=docker; auth=; fi
[ -z "$created" ] || docker service rm $created >/dev/null 2>&1 || true
if [ -n "$previous" ]; then
  $docker stack deploy --detach=true --resolve-image never $auth --compose-file "$previous" "$stack"
else
  for s in "$@"; do docker service rollback --detach "${stack}_$s" >/dev/null 2>&1 || true; done
fi
"""


def stack_back(stack: str, previous_file: str, config_dir: str, created: tuple[str, ...],
               changed: tuple[str, ...]) -> Command:
    return script(STACK_BACK, stack, previous_file, config_dir, *created, "--", *changed,
                  description="put the stack back", intent=("stack-back", stack, created, changed), timeout=600)


# On an edge node: the gateway container of the stack, `nginx -t` and a graceful reload; prints "reloaded".
RELOAD_GATEWAY = r"""c=$(docker ps -q --filter "label=com.docker.swarm.service.name=$1_gateway" | head -n 1)
[ -n "$c" ] || exit 0
docker exec "$c" nginx -t -q -c "$2" && docker exec "$c" nginx -s reload -c "$2" && echo reloaded
"""


def reload_gateway(stack: str, conf: str) -> Command:
    return script(RELOAD_GATEWAY, stack, conf, description="reload the gateway", intent=("gateway-reload", stack))


# Undo of installed gateway files on an edge node: each one's previous copy back (or removed), then a reload.
RESTORE_GATEWAY_FILES = r"""stack="$1"; conf="$2"; shift 2
for f in "$@"; do if [ -f "$f.prev" ]; then mv -f "$f.prev" "$f"; else rm -f "$f"; fi; done
""" + RELOAD_GATEWAY.replace('"$1_gateway"', '"${stack}_gateway"').replace('"$2"', '"$conf"')


def restore_gateway_files(stack: str, conf: str, paths: tuple[str, ...]) -> Command:
    return script(RESTORE_GATEWAY_FILES, stack, conf, *paths, description="restore the gateway files",
                  intent=("gateway-restore", stack))
