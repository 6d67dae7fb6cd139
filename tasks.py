"""Local tasks: `inv sandbox.up`, `inv testbed.up`, `inv images.build`, `inv demo`, `inv test`, `inv bench`.

Thin on purpose: the work lives in deploy/ (sandbox/setup.py, sandbox/hosts.py, sandbox/netns.py,
sandbox/images.py, cli/).
"""

import os
import sys

from invoke import Collection, task

from deploy import cli
from deploy.cli import backup as cli_backup
from deploy.cli import day2
from deploy.cli import deploy as cli_deploy
from deploy.cli import health as cli_health
from deploy.sandbox import hosts as sandbox_lib
from deploy.sandbox import setup as setup_lib

cli.install_argument_hints("inv")  # `inv --env prod checklist`: one line saying where --env goes, exit 2


@task(help={"hosts": "comma-separated sandbox host names: sandbox, sandbox2, ... (127.0.0.2, .3, ...)"})
@cli.entry
def up(c, hosts="sandbox"):
    """Start sandbox SSH hosts on loopback (installs Docker, sshd and Compose v2 when missing)."""
    started = sandbox_lib.up([h.strip() for h in hosts.split(",") if h.strip()])
    for host in started:
        print(f"{host.name}: ssh -F .sandbox/ssh_config {host.name}  ({host.address}:{host.port})")


@task
@cli.entry
def down(c):
    """Stop the sandbox SSH hosts (containers and images stay)."""
    print("stopped: " + (", ".join(sandbox_lib.down()) or "nothing"))


@task
@cli.entry
def install(c):
    """Install Docker, OpenSSH server, debootstrap and Compose v2 if missing; start dockerd."""
    setup_lib.ensure_machine()


@task(help={"force": "rebuild even when the images exist"})
@cli.entry
def build(c, force=False):
    """Build the offline images (debootstrap base, PostgreSQL, Redis, nginx, ...) with no registry."""
    from deploy.sandbox import images

    setup_lib.ensure_machine()
    images.build_all(force=force)


@task
@cli.entry
def demo(c):
    """Main job: sandbox host + images, then deploy the demo stack over SSH and show it healthy."""
    from deploy.sandbox import images
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    setup_lib.ensure_machine()
    sandbox_lib.up(["sandbox"], install=False)
    images.build_all()
    runtime = cli.Runtime(load_settings("sandbox"), Console())
    cli_deploy.deploy(runtime, ["sandbox"])
    return day2.show_endpoints(runtime, ["sandbox"])


@task(help={"k": "only tests matching this expression", "unit": "unit tests only (no sshd, no Docker)",
            "workers": "parallel workers, one test module each (each its own sandbox hosts); 1 = serial"})
def test(c, k=None, unit=False, workers=3):
    """Run the tests (unit + integration against the sandbox and the namespaced test bed)."""
    args = [sys.executable, "-m", "pytest", "-q", "--durations=40"]
    if int(workers) > 1:
        args += ["-n", str(int(workers)), "--dist", "loadfile", "--no-loadscope-reorder"]
    if unit:
        args += ["-m", "not integration"]
    if k:
        args += ["-k", k]
    # The tests start `fab` and `inv` hundreds of times. Where PYTHONDONTWRITEBYTECODE is set (this kind of
    # machine sets it) each one compiled the checkout again: about 0.15 s of CPU each, measured with `fab --list`.
    import compileall

    root = os.path.dirname(os.path.abspath(__file__))
    for name in ("deploy", "fabfile", "tests", "bench"):
        compileall.compile_dir(os.path.join(root, name), quiet=1)
    compileall.compile_file(os.path.join(root, "tasks.py"), quiet=1)
    os.execv(sys.executable, args)


@task(help={"env": "environment name (env/NAME.env)", "json": "print JSON (schema: docs/checklist.md)",
            "junit": "also write JUnit XML to this file", "file": "checklist file (default env/[NAME.]checklist.toml)"})
@cli.entry
def checklist(c, env, json=False, junit=None, file=None):
    """Compute every release-checklist item, print pass/warn/fail; exit 7 on any failure. Changes nothing."""
    from deploy.core.console import Console
    from deploy.core.errors import HealthdeployError
    from deploy.core.settings import load_settings

    try:
        settings = load_settings(env)
    except HealthdeployError as exc:  # the reports are still written, the problems as failed checks
        cli_health.refused_checklist(env, exc, json, junit, Console())
        raise
    return cli_health.checklist(cli.Runtime(settings, Console()), as_json=json, junit=junit, file=file)


@task(default=True, help={"env": "environment name", "host": "host to back up (default: PRIMARY_HOST)",
                          "services": "comma-separated: postgres,influxdb,mongodb,minio,redis,qdrant (default: BACKUP_SERVICES)",
                          "json": "print the manifest as JSON"})
@cli.entry
def backup(c, env, host=None, services=None, json=False):
    """Pull a verified backup set (databases + MinIO objects) to backups/<env>/<UTC time>/ (streamed, checksummed)."""
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    wanted = tuple(x.strip() for x in services.split(",") if x.strip()) if services else None
    return cli_backup.run_backup(cli.Runtime(load_settings(env), Console()), host, wanted, as_json=json)


@task(name="list", help={"env": "environment name", "json": "print JSON"})
@cli.entry
def backup_list(c, env, json=False):
    """List the backup sets of an environment (newest last) and whether a restore drill verified them."""
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    return cli_backup.list_backups(cli.Runtime(load_settings(env), Console()), as_json=json)


@task(name="prune", help={"env": "environment name", "last": "keep the newest N sets (default 7)",
                          "daily": "one per day, N days (default 7)", "weekly": "one per week, N weeks (default 4)",
                          "monthly": "one per month, N months (default 6)",
                          "dry-run": "only show what would be deleted", "json": "print JSON"})
@cli.entry
def backup_prune(c, env, last=None, daily=None, weekly=None, monthly=None, dry_run=False, json=False):
    """Apply the retention policy to backups/<env>/ (the newest verified set is always kept)."""
    from deploy.core.console import Console
    from deploy.plan.retention import Policy
    from deploy.core.settings import load_settings

    policy = Policy(*(cli.parse_int(v, n, d) for v, n, d in ((last, "last", 7), (daily, "daily", 7),
                                                              (weekly, "weekly", 4), (monthly, "monthly", 6))))
    return cli_backup.prune_backups(cli.Runtime(load_settings(env), Console()), policy, dry_run=dry_run, as_json=json)


@task(name="keygen", help={"out": "where to write the private key (mode 0600; keep it off the servers)",
                           "signing": "an ed25519 key that signs backup manifests (BACKUP_SIGNING_KEY) instead of an "
                                      "age encryption key",
                           "allowed-signers": "with --signing: also append the public key to this file "
                                              "(BACKUP_ALLOWED_SIGNERS)"})
@cli.entry
def backup_keygen(c, out, signing=False, allowed_signers=None):
    """Make a key pair: age for encryption (prints BACKUP_AGE_RECIPIENTS) or, with --signing, ed25519 for signing."""
    from deploy.core.console import Console

    return cli_backup.backup_keygen(Console(), out, signing=signing, allowed_signers=allowed_signers)


@task(name="verify", help={"env": "environment name", "from": "set name (or latest)", "json": "print JSON"})
@cli.entry
def backup_verify(c, env, from_="latest", json=False):
    """Restore drill: restore a set into throwaway containers and compare with its manifest (verify.json)."""
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    return cli_backup.run_verify(cli.Runtime(load_settings(env), Console()), from_, as_json=json)


@task(help={"env": "environment name", "from": "backup set name, path, or latest", "host": "default: PRIMARY_HOST",
            "services": "comma-separated subset (postgres,influxdb,mongodb,minio)", "yes": "do not ask (production)",
            "no-safety-backup": "skip the backup of the current data (production: also --yes-really)",
            "yes-really": "confirm --no-safety-backup on production", "break-lock": "remove a stale lock",
            "other-host": "restore a set taken on another host (on purpose)",
            "dry-run": "print the restore plan after every check of the set; change nothing",
            "json": "print the result (each store's state) as JSON"})
@cli.entry
def restore(c, env, from_, host=None, services=None, yes=False, no_safety_backup=False, break_lock=False,
            other_host=False, dry_run=False, yes_really=False, json=False):
    """Restore a set beside the live data, check it, then switch every store at once (all or nothing)."""
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    wanted = tuple(x.strip() for x in services.split(",") if x.strip()) if services else None
    return cli_backup.run_restore(cli.Runtime(load_settings(env), Console()), from_, host, wanted, yes=yes,
                                  safety_backup=not no_safety_backup, break_lock=break_lock, other_host=other_host,
                                  dry_run=dry_run, yes_really=yes_really, as_json=json)


@task(name="release", help={"env": "environment name", "checklist": "checklist file (default env/[NAME.]checklist.toml)"})
@cli.entry
def release_(c, env, checklist=None):
    """Scripted release: checklist, backup + drill, deploy, health, checklist again; stops at the first failure."""
    from deploy.core.console import Console
    from deploy.core.settings import load_settings

    return cli_health.release(cli.Runtime(load_settings(env), Console()), checklist_file=checklist)


@task(help={"which": "deploy, backup, streaming or build"})
def bench(c, which="deploy"):
    """Benchmarks side by side with their baselines; prints a Markdown table (bench/results/)."""
    os.execv(sys.executable, [sys.executable, f"bench/{which}_bench.py"])


@task(name="up", help={"hosts": "comma-separated node names: node1, node2, ... (10.251.0.2, .3, ...)",
                        "registry": "also run the registry on 10.251.0.1:5000 (for Swarm targets)"})
@cli.entry
def testbed_up(c, hosts="node1,node2,node3", registry=False):
    """Testbed: hosts as network namespaces on bridge hdbr0, each with its own dockerd and sshd (idempotent)."""
    from deploy.sandbox import netns

    for report in netns.up(hosts.split(",")):
        print(report.line())
    if registry:
        print(f"registry: {netns.ensure_registry()}")


@task(name="down", help={"hosts": "only these nodes (default: all, and the bridge, rule and registry)",
                          "purge": "also delete their data roots (images, containers, host keys)"})
@cli.entry
def testbed_down(c, hosts=None, purge=False):
    """Stop testbed nodes and remove their namespaces (their data roots stay for the next up)."""
    from deploy.sandbox import netns

    print("stopped: " + (", ".join(netns.down(hosts.split(",") if hosts else None, purge=purge)) or "nothing"))


@task(name="cut")
@cli.entry
def testbed_cut(c, node):
    """Cut a node off the network (its veth down); it keeps running."""
    from deploy.sandbox import netns

    netns.cut(node)
    print(f"{node}: cut off")


@task(name="heal")
@cli.entry
def testbed_heal(c, node):
    """Bring a cut node back on the network."""
    from deploy.sandbox import netns

    netns.heal(node)
    print(f"{node}: back")


@task(name="status")
@cli.entry
def testbed_status(c):
    """Nodes, their link, dockerd/containerd pids and memory, sshd."""
    from deploy.sandbox import netns

    for row in netns.status():
        print(f"{row['node']}: {row['address']} link {row['link']}, dockerd {row['dockerd_pid']} "
              f"({row['dockerd_rss_kib'] // 1024} MiB) + containerd {row['containerd_pid']} "
              f"({row['containerd_rss_kib'] // 1024} MiB), sshd {row['sshd_pid']}, engine "
              f"{'answers' if row['engine'] else 'DOWN'}")


ns = Collection(demo, test, bench, checklist, release_)
ns.add_collection(Collection("sandbox", up, down, install))
ns.add_collection(Collection("testbed", testbed_up, testbed_down, testbed_cut, testbed_heal, testbed_status))
ns.add_collection(Collection("images", build))
ns.add_collection(Collection("backup", backup, backup_list, backup_verify, backup_prune, backup_keygen))
ns.add_task(restore)
