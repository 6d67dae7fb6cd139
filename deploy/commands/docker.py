"""Docker and Compose command builders (argv only; see ``commands.base`` for the quoting rules)."""

from __future__ import annotations

from .base import Command, cmd, script
from .probe import HTTP_GET_FUNCTION


def compose(project: str, compose_file: str, env_file: str, *args: str, description: str,
            readonly: bool = False) -> Command:
    return cmd("docker", "compose", "--project-name", project, "--file", compose_file, "--env-file", env_file,
               *args, description=description, readonly=readonly)


def compose_config_check(project: str, compose_file: str, env_file: str) -> Command:
    return compose(project, compose_file, env_file, "config", "--quiet",
                   description="validate the compose file", readonly=True)


def compose_build(project: str, compose_file: str, env_file: str, services: tuple[str, ...]) -> Command:
    return compose(project, compose_file, env_file, "build", *services, description="build images")


def compose_up_infra(project: str, compose_file: str, env_file: str, services: tuple[str, ...],
                     timeout: int) -> Command:
    # --no-recreate: a deploy never changes running infrastructure; it only starts what is absent.
    return compose(project, compose_file, env_file, "up", "--detach", "--no-recreate", "--wait",
                   "--wait-timeout", str(timeout), *services, description="start infrastructure")


def compose_scale_up(project: str, compose_file: str, env_file: str, service: str, count: int) -> Command:
    # New containers beside the old ones; --no-recreate keeps the old ones untouched.
    return compose(project, compose_file, env_file, "up", "--detach", "--no-deps", "--no-recreate",
                   "--scale", f"{service}={count}", service, description=f"start new {service} containers")


def compose_run(project: str, compose_file: str, env_file: str, service: str, shell_command: str,
                description: str) -> Command:
    return compose(project, compose_file, env_file, "run", "--rm", "--no-deps", "-T", service,
                   "sh", "-c", shell_command, description=description)


def project_containers(project: str) -> Command:
    """JSON array of ``docker inspect`` for every container of the project (one round trip)."""
    return script(
        'ids=$(docker ps -aq --filter "label=com.docker.compose.project=$1"); '
        'if [ -n "$ids" ]; then docker inspect $ids; else echo "[]"; fi',
        project, description="list containers", readonly=True,
    )


def inspect_named(names: tuple[str, ...]) -> Command:
    """JSON array of ``docker inspect`` for the named containers that exist (one CLI call, no listing)."""
    return script('docker inspect "$@" 2>/dev/null || true', *names, description="inspect containers", readonly=True)


def image_ids(refs: tuple[str, ...]) -> Command:
    """``ref id`` per line; a missing image prints ``ref -``."""
    return script(
        'for ref in "$@"; do id=$(docker image inspect --format "{{.Id}}" "$ref" 2>/dev/null) || id=-; '
        'echo "$ref $id"; done',
        *refs, description="inspect images", readonly=True,
    )


def stop_containers(ids: tuple[str, ...], timeout: int = 15) -> Command:
    return cmd("docker", "stop", "--time", str(timeout), *ids, description="stop old containers")


def start_containers(ids: tuple[str, ...]) -> Command:
    return cmd("docker", "start", *ids, description="start containers again")


def remove_containers(ids: tuple[str, ...]) -> Command:
    return cmd("docker", "rm", "--force", "--volumes", *ids, description="remove containers")


def remove_images(refs: tuple[str, ...]) -> Command:
    # Images still used by a container are kept (docker refuses); that is what we want.
    return script('docker image rm "$@" >/dev/null 2>&1; exit 0', *refs, description="remove images of pruned releases")


def exec_in(container: str, *argv: str, description: str, readonly: bool = False) -> Command:
    return cmd("docker", "exec", container, *argv, description=description, readonly=readonly)


HTTP_GET = 'timeout_s="$2"' + HTTP_GET_FUNCTION + 'http_get "$1"'


def http_probe(container: str, url: str, timeout: int = 3) -> Command:
    """GET ``url`` from inside ``container`` (curl or busybox wget, whichever the image has)."""
    return exec_in(container, "sh", "-c", HTTP_GET, "sh", url, str(timeout),
                   description=f"probe {url}", readonly=True)


def nginx_test(container: str, conf: str) -> Command:
    return exec_in(container, "nginx", "-t", "-q", "-c", conf, description="check gateway config", readonly=True)


def nginx_reload(container: str, conf: str) -> Command:
    # A graceful reload: old workers finish their requests; never a restart.
    return exec_in(container, "nginx", "-s", "reload", "-c", conf, description="reload gateway")


def nginx_check_files(image: str, gateway_dir_host: str, upstreams_host: str, mount_at: str, conf: str,
                      tls_host: str) -> Command:
    """``nginx -t`` of not-yet-live gateway files (and staged TLS files) in a throwaway container."""
    return cmd("docker", "run", "--rm", "--network", "none",
               "--volume", f"{gateway_dir_host}:{mount_at}:ro",
               "--volume", f"{upstreams_host}:{mount_at}/upstreams:ro",
               "--volume", f"{tls_host}:{mount_at}/tls:ro",
               image, "nginx", "-t", "-q", "-c", conf,
               description="check new gateway config", readonly=True)


def logs_tail(container: str, lines: int = 30) -> Command:
    return cmd("docker", "logs", "--tail", str(lines), container, description="container logs", readonly=True)


def published_port(container: str, port: int) -> Command:
    return cmd("docker", "port", container, f"{port}/tcp", description=f"published address of {port}/tcp",
               readonly=True)


# The service env files are written for Compose (values in single quotes); `docker run --env-file` keeps
# quotes, so a 0600 unquoted copy is made for the run and removed right after.
RUN_WITH_ENV_FILE = r"""set -e
umask 077
f=$(mktemp)
trap 'rm -f "$f"' EXIT
sed -n "s/^\([A-Za-z_][A-Za-z0-9_]*\)='\(.*\)'\$/\1=\2/p" "$1" > "$f"
shift
docker run --env-file "$f" "$@"
"""


def run_throwaway(name: str, image: str, *args: str, env_file: str = "", publish: int | None = None,
                  network: str | None = None, tmpfs: tuple[str, ...] = (), environment: tuple[str, ...] = (),
                  description: str) -> Command:
    """A detached, self-removing container for a restore drill. Credentials come from a service env file on
    the host, never from argv; a published port is on host loopback with an ephemeral number."""
    options = ["-d", "--rm", "--name", name, "--label", "healthdeploy.role=drill"]
    if publish:
        options += ["-p", f"127.0.0.1::{publish}"]
    if network:
        options += ["--network", network]
    for path in tmpfs:
        options += ["--tmpfs", path]
    for assignment in environment:  # only values that are not secrets of the system
        options += ["-e", assignment]
    if env_file:
        return cmd("bash", "-c", RUN_WITH_ENV_FILE, "bash", env_file, *options, image, *args, description=description)
    return cmd("docker", "run", *options, image, *args, description=description)


def remove_force(name: str, description: str = "remove the throwaway container") -> Command:
    return cmd("docker", "rm", "-f", "-v", name, description=description)
