"""Docker and Compose command builders (argv only; see ``commands.base`` for the quoting rules)."""

from __future__ import annotations

from .base import Command, cmd, script, with_env
from .probe import HTTP_GET_FUNCTION

BUILD_TIMEOUT = 3600
MIGRATE_TIMEOUT = 1800


def compose(project: str, compose_file: str, env_file: str, *args: str, description: str,
            readonly: bool = False, environment: dict[str, str] | None = None, intent: tuple = (),
            timeout: float | None = None) -> Command:
    base = cmd("docker", "compose", "--project-name", project, "--file", compose_file, "--env-file", env_file,
               *args, description=description, readonly=readonly, intent=intent, timeout=timeout)
    return with_env(base, environment or {})


def compose_config_check(project: str, compose_file: str, env_file: str) -> Command:
    return compose(project, compose_file, env_file, "config", "--quiet",
                   description="validate the compose file", readonly=True, intent=("compose-config",))


def compose_build(project: str, compose_file: str, env_file: str, services: tuple[str, ...],
                  override_file: str = "") -> Command:
    """``docker compose build``; ``override_file`` (a build off the host) renames the images it tags."""
    extra = ("--file", override_file) if override_file else ()
    return compose(project, compose_file, env_file, *extra, "build", *services, description="build images",
                   intent=("build", *services), timeout=BUILD_TIMEOUT)


# -- images built off the host (docs/build.md) -------------------------------------------------------------
PUSHED_MARKER = "HEALTHDEPLOY-PUSHED "
SHIPPED_MARKER = "HEALTHDEPLOY-SHIPPED "

# $1 registry (127.0.0.1:port), then pairs: local tag, repository in the registry. Each image is pushed under a
# temporary tag (dockerd skips every blob the registry has), its digest and ID reported, the temporary
# references removed again (the build side keeps only its own tag).
PUSH_IMAGES = r"""reg="$1"; shift
while [ $# -ge 2 ]; do
  src="$1"; repo="$2"; shift 2
  ref="$reg/$repo:push"
  docker tag "$src" "$ref" || exit 1
  if ! docker push "$ref"; then docker image rm "$ref" >/dev/null 2>&1; exit 1; fi
  digest=$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref" | grep -F "$reg/$repo@" | head -n 1 | cut -d @ -f 2)
  id=$(docker image inspect --format '{{.Id}}' "$ref")
  docker image rm "$ref" >/dev/null
  [ -n "$digest" ] && docker image rm "$reg/$repo@$digest" >/dev/null 2>&1
  [ -n "$digest" ] || { echo "the registry reported no digest for $src" >&2; exit 1; }
  echo "HEALTHDEPLOY-PUSHED $src $id $digest"
done
"""

# A pull's own reference (127.0.0.1:<any tunnel port>/<repository>@<digest>) outlives a ship cut between the pull
# and its removal (the operator killed, the connection lost): the image then lingers untagged. Each ship, and the
# undo of one, first removes such references of the repositories it ships (a tag a container uses keeps its image).
FORGET_PULL_REFS_FUNCTION = r"""
forget_pull_refs() {  # the repositories; one listing for all of them
  docker images --digests --format '{{.Repository}}@{{.Digest}}' | while read -r ref; do
    for repo in "$@"; do
      case "$ref" in "127.0.0.1:"*"/$repo@sha256:"*) docker image rm "$ref" >/dev/null 2>&1; break ;; esac
    done
  done
}
"""

# $1 registry as the host sees it (127.0.0.1:<tunnel port>), then quadruples: image ID, repository, digest, tag.
# An image the host has already (same ID) is only tagged; any other is pulled by digest (dockerd fetches only the
# blobs it lacks), tagged, and the pull's own reference removed, so `docker image ls` shows the release tags only.
SHIP_IMAGES = FORGET_PULL_REFS_FUNCTION + r"""reg="$1"; shift
repos=""; i=0
for w in "$@"; do [ $((i % 4)) -eq 1 ] && repos="$repos $w"; i=$((i + 1)); done
forget_pull_refs $repos
while [ $# -ge 4 ]; do
  id="$1"; repo="$2"; digest="$3"; tag="$4"; shift 4
  if [ "$(docker image inspect --format '{{.Id}}' "$id" 2>/dev/null)" = "$id" ]; then
    docker tag "$id" "$tag" || exit 1
    echo "already here: $tag"
  else
    docker pull "$reg/$repo@$digest" || exit 1
    docker tag "$reg/$repo@$digest" "$tag" || exit 1
    docker image rm "$reg/$repo@$digest" >/dev/null || exit 1
  fi
  got=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null)
  [ "$got" = "$id" ] || { echo "$tag is ${got:-missing} after the pull, expected $id" >&2; exit 1; }
  echo "HEALTHDEPLOY-SHIPPED $tag"
done
"""


def push_images(registry: str, pairs: tuple[tuple[str, str], ...]) -> Command:
    """Push each (local tag, registry repository) to ``registry``; prints one PUSHED line per image."""
    words = [w for pair in pairs for w in pair]
    return script(PUSH_IMAGES, registry, *words, description="push images to the shipping registry",
                  intent=("push", registry, *words), timeout=BUILD_TIMEOUT)


def parse_pushed(text: str) -> dict[str, tuple[str, str]]:
    """PUSHED lines -> {local tag: (image ID, manifest digest)}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(PUSHED_MARKER):
            fields = line[len(PUSHED_MARKER):].split()
            if len(fields) == 3 and fields[1].startswith("sha256:") and fields[2].startswith("sha256:"):
                out[fields[0]] = (fields[1], fields[2])
    return out


def ship_images(registry: str, entries: tuple[tuple[str, str, str, str], ...]) -> Command:
    """On a host: each (image ID, repository, digest, release tag) from ``registry`` by digest, then tagged."""
    for image_id, _, digest, _ in entries:
        if not (image_id.startswith("sha256:") and digest.startswith("sha256:")):
            raise ValueError(f"not an image ID and digest: {image_id!r} {digest!r}")
    words = [w for entry in entries for w in entry]
    return script(SHIP_IMAGES, registry, *words, description="pull images built off the host",
                  intent=("ship", registry, *words), timeout=BUILD_TIMEOUT)


# $1 the number of tags, then the tags, then the repositories they were shipped from.
UNSHIP_IMAGES = FORGET_PULL_REFS_FUNCTION + r"""n="$1"; shift
while [ "$n" -gt 0 ]; do docker image rm "$1" >/dev/null 2>&1; shift; n=$((n - 1)); done
[ $# -gt 0 ] && forget_pull_refs "$@"
exit 0
"""


def unship_images(tags: tuple[str, ...], repositories: tuple[str, ...]) -> Command:
    """Undo of a ship: the release tags it added and any reference a cut pull left (an image a container uses stays)."""
    return script(UNSHIP_IMAGES, str(len(tags)), *tags, *repositories, description="remove the images shipped",
                  intent=("unship", str(len(tags)), *tags, *repositories))


def parse_shipped(text: str) -> list[str]:
    return [line[len(SHIPPED_MARKER):].strip() for line in text.splitlines() if line.startswith(SHIPPED_MARKER)]


def compose_up(project: str, compose_file: str, env_file: str, services: tuple[str, ...], timeout: int,
               environment: dict[str, str] | None = None) -> Command:
    # --no-recreate: starting what is absent or stopped never recreates what runs.
    return compose(project, compose_file, env_file, "up", "--detach", "--no-recreate", "--no-deps", "--wait",
                   "--wait-timeout", str(timeout), *services, description=f"start {', '.join(services)}",
                   environment=environment, intent=("start", *services), timeout=timeout + 120)


def compose_recreate(project: str, compose_file: str, env_file: str, service: str, timeout: int,
                     environment: dict[str, str] | None = None) -> Command:
    # A stateful service is stopped before its new container starts: never two copies on one volume.
    return compose(project, compose_file, env_file, "up", "--detach", "--force-recreate", "--no-deps", "--wait",
                   "--wait-timeout", str(timeout), service, description=f"recreate {service}",
                   environment=environment, intent=("recreate", service), timeout=timeout + 120)


def compose_scale_up(project: str, compose_file: str, env_file: str, service: str, count: int,
                     environment: dict[str, str] | None = None) -> Command:
    # New containers beside the old ones; --no-recreate keeps the old ones untouched.
    return compose(project, compose_file, env_file, "up", "--detach", "--no-deps", "--no-recreate",
                   "--scale", f"{service}={count}", service, description=f"start new {service} containers",
                   environment=environment, intent=("scale", service, count), timeout=300)


def compose_run(project: str, compose_file: str, env_file: str, service: str, shell_command: str,
                description: str, name: str = "", environment: dict[str, str] | None = None) -> Command:
    named = ("--name", name) if name else ()
    command = compose(project, compose_file, env_file, "run", "--rm", "--no-deps", "-T", *named, service,
                      "sh", "-c", shell_command, description=description, environment=environment,
                      intent=("run", service), timeout=MIGRATE_TIMEOUT)
    # Killed at its deadline, the one-off container must go too, or it would overlap the next attempt.
    return command.tagged("run", service, on_timeout=remove_force(name) if name else None)


def tag_images(pairs: tuple[tuple[str, str], ...]) -> Command:
    """``docker tag SRC DST`` for each pair (unchanged services keep their image under the new release)."""
    words: list[str] = []
    for source, target in pairs:
        words += [source, target]
    return script('while [ $# -ge 2 ]; do docker tag "$1" "$2" || exit 1; shift 2; done', *words,
                  description="tag unchanged images", intent=("tag", *words))


def stop_containers(ids: tuple[str, ...], timeout: int = 15) -> Command:
    return cmd("docker", "stop", "--time", str(timeout), *ids, description="stop old containers",
               intent=("stop", *ids), timeout=timeout + 60)


def start_containers(ids: tuple[str, ...]) -> Command:
    return cmd("docker", "start", *ids, description="start containers again", intent=("start-ids", *ids))


def restart_containers(ids: tuple[str, ...], timeout: int = 30) -> Command:
    return cmd("docker", "restart", "--time", str(timeout), *ids, description="restart containers",
               intent=("restart", *ids), timeout=timeout + 60)


def remove_containers(ids: tuple[str, ...]) -> Command:
    return cmd("docker", "rm", "--force", "--volumes", *ids, description="remove containers", intent=("rm", *ids))


def remove_images(refs: tuple[str, ...]) -> Command:
    # Images still used by a container are kept (docker refuses); that is what we want.
    return script('docker image rm "$@" >/dev/null 2>&1; exit 0', *refs, description="remove images of pruned releases",
                  intent=("rmi", *refs))


def exec_in(container: str, *argv: str, description: str, readonly: bool = False, intent: tuple = (),
            timeout: float | None = None) -> Command:
    return cmd("docker", "exec", container, *argv, description=description, readonly=readonly, intent=intent,
               timeout=timeout)


def health_test(container: str, test: tuple[str, ...], timeout_s: float) -> Command | None:
    """The container's own health check (``Config.Healthcheck.Test``), run now as Docker runs it: an exec with the
    container's user and environment, ``CMD-SHELL`` through ``/bin/sh -c``. None when it has no test to run."""
    if not test or test[0] not in ("CMD", "CMD-SHELL") or len(test) < 2:
        return None
    argv = ("/bin/sh", "-c", test[1]) if test[0] == "CMD-SHELL" else tuple(test[1:])
    return exec_in(container, *argv, description="run the container's health check", readonly=True,
                   intent=("health-test", container), timeout=(timeout_s or 30) + 5)


# GET ``$1`` (timeout ``$2``) up to ``$3`` times, 0.2 s apart, until it answers: right after `nginx -s reload`
# (which only signals the master) a request can still reach a worker of the old configuration.
HTTP_GET = ('timeout_s="$2"; attempts="$3"' + HTTP_GET_FUNCTION +
            'while :; do http_get "$1" && exit 0; attempts=$((attempts - 1)); '
            '[ "$attempts" -gt 0 ] || exit 1; sleep 0.2; done')


def http_probe(container: str, url: str, timeout: int = 3, within: float = 0) -> Command:
    """GET ``url`` from inside ``container`` (curl or busybox wget, whichever the image has); with ``within``,
    tried again for about that many seconds until it answers (a reload taking effect)."""
    return exec_in(container, "sh", "-c", HTTP_GET, "sh", url, str(timeout), str(max(1, int(within / 0.2))),
                   description=f"probe {url}", readonly=True, intent=("probe", url))


# Several GETs in one round trip: "ok URL" or "fail URL" per line (warming new containers, checking each).
# URLs after a "--" word are warm-up requests: sent only when every probe before it passed, answers not printed.
HTTP_GETS = ('timeout_s="$1"; shift' + HTTP_GET_FUNCTION +
             'failed=0; warm=""; for u in "$@"; do '
             'if [ -z "$warm" ] && [ "$u" = -- ]; then [ "$failed" = 0 ] || exit 0; warm=1; continue; fi; '
             'if http_get "$u"; then [ -n "$warm" ] || echo "ok $u"; '
             'else failed=1; [ -n "$warm" ] || echo "fail $u"; fi; done')


def http_probes(container: str, urls: tuple[str, ...], timeout: int = 3, then_warm: tuple[str, ...] = ()) -> Command:
    """GET each URL from inside ``container`` ("ok URL" / "fail URL" lines); then, in the same exec and only if all
    passed, the ``then_warm`` requests (a roll's first requests to new containers: one exec less per roll)."""
    warm = ("--", *then_warm) if then_warm else ()
    return exec_in(container, "sh", "-c", HTTP_GETS, "sh", str(timeout), *urls, *warm,
                   description="probe new containers", readonly=True, intent=("probes", *urls))


# One exec, not two: each ``docker exec`` costs the engine a runc exec, and a roll reloads twice per service.
NGINX_TEST_AND_RELOAD = 'nginx -t -q -c "$1" || exit 1; exec nginx -s reload -c "$1"'


def nginx_test_and_reload(container: str, conf: str) -> Command:
    """``nginx -t``, then (only if it passed) a graceful reload: old workers finish their requests; never a
    restart."""
    return exec_in(container, "sh", "-c", NGINX_TEST_AND_RELOAD, "sh", conf,
                   description="check gateway config and reload gateway", intent=("nginx-reload",))


def nginx_check_files(image: str, gateway_dir_host: str, upstreams_host: str, mount_at: str, conf: str,
                      tls_host: str) -> Command:
    """``nginx -t`` of not-yet-live gateway files (and staged TLS files) in a throwaway container."""
    return cmd("docker", "run", "--rm", "--network", "none",
               "--volume", f"{gateway_dir_host}:{mount_at}:ro",
               "--volume", f"{upstreams_host}:{mount_at}/upstreams:ro",
               "--volume", f"{tls_host}:{mount_at}/tls:ro",
               image, "nginx", "-t", "-q", "-c", conf,
               description="check new gateway config", readonly=True, intent=("nginx-check",))


def logs_tail(container: str, lines: int = 30) -> Command:
    return cmd("docker", "logs", "--tail", str(lines), container, description="container logs", readonly=True,
               intent=("logs", container))


# The service env files are written for Compose (values in single quotes); `docker run --env-file` keeps
# quotes, so a 0600 unquoted copy of each given file is made for the run and removed right after.
RUN_WITH_ENV_FILE = r"""set -e
umask 077
f=$(mktemp)
trap 'rm -f "$f"' EXIT
n="$1"; shift
i=0; while [ "$i" -lt "$n" ]; do
  sed -n "s/^\([A-Za-z_][A-Za-z0-9_]*\)='\(.*\)'\$/\1=\2/p" "$1" >> "$f"; shift; i=$((i + 1))
done
docker run --env-file "$f" "$@"
"""


def run_throwaway(name: str, image: str, *args: str, env_files: tuple[str, ...] = (), publish: int | None = None,
                  network: str | None = None, tmpfs: tuple[str, ...] = (), environment: tuple[str, ...] = (),
                  memory: str = "", description: str) -> Command:
    """A detached, self-removing container for a restore drill. Credentials come from service env files on
    the host, never from argv; a published port is on host loopback with an ephemeral number."""
    options = ["-d", "--rm", "--name", name, "--label", "healthdeploy.role=drill"]
    if memory:
        options += ["--memory", memory]
    if publish:
        options += ["-p", f"127.0.0.1::{publish}"]
    if network:
        options += ["--network", network]
    for path in tmpfs:
        options += ["--tmpfs", path]
    for assignment in environment:  # only values that are not secrets of the system
        options += ["-e", assignment]
    if env_files:
        return cmd("bash", "-c", RUN_WITH_ENV_FILE, "bash", str(len(env_files)), *env_files, *options, image, *args,
                   description=description, intent=("drill", name))
    return cmd("docker", "run", *options, image, *args, description=description, intent=("drill", name))


def remove_force(name: str, description: str = "remove the throwaway container") -> Command:
    return cmd("docker", "rm", "-f", "-v", name, description=description, intent=("rm", name))


def container_state(name: str) -> Command:
    """A container's state (running, exited, ...); empty output when there is no such container."""
    return script('docker inspect --format "{{.State.Status}}" "$1" 2>/dev/null; exit 0', name,
                  description="read a container's state", readonly=True, intent=("container-state", name))
