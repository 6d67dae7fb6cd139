"""Command builders: argv in, one quoted command line out; secrets refused; scripts take values as $1..."""

import shlex

import pytest

from deploy.commands import and_then, cmd, pipe
from deploy.commands import docker as dk
from deploy.commands import files as fs
from deploy.facts.containers import project_containers
from deploy.facts.host import host_facts
from deploy.commands.base import checksummed_stdout, parse_checksum, script
from deploy.core.secret import Secret, redact


def test_quoting_happens_once_in_render():
    c = cmd("docker", "exec", "pg", "psql", "-c", "select 'x'; drop table y")
    assert c.render() == "docker exec pg psql -c 'select '\"'\"'x'\"'\"'; drop table y'"
    assert pipe(cmd("a", "b c"), cmd("gzip")).render() == "a 'b c' | gzip"
    assert and_then(cmd("true"), cmd("echo", "$HOME")).render() == "true && echo '$HOME'"


def test_secret_never_enters_a_command_line():
    with pytest.raises(TypeError, match="Secret cannot be part of a command line"):
        cmd("redis-cli", "-a", Secret("hunter2"))
    assert str(Secret("hunter2")) == "***" and f"{Secret('hunter2')}" == "***" and "hunter2" not in repr(Secret("hunter2"))


def test_non_string_words_refused():
    with pytest.raises(TypeError):
        cmd("sleep", 3)


def test_stdin_is_not_displayed():
    c = fs.write_file("/srv/x/shared/env/backend.env", b"JWT_SECRET='topsecret'\n", "0600")
    assert "topsecret" not in c.display() and "topsecret" not in c.render()
    assert c.display().endswith("# stdin: 23 bytes")
    assert c.render().startswith("sh -c ")
    assert c.render().endswith(" sh /srv/x/shared/env/backend.env 0600")


def test_compose_scale_up_command():
    c = dk.compose_scale_up("hd-prod", "/srv/r/1/compose.yaml", "/srv/r/1/release.env", "backend", 2)
    assert c.render() == ("docker compose --project-name hd-prod --file /srv/r/1/compose.yaml --env-file "
                          "/srv/r/1/release.env up --detach --no-deps --no-recreate --scale backend=2 backend")
    assert not c.readonly


def test_migration_command_is_one_word_for_sh():
    c = dk.compose_run("p", "f", "e", "backend", "pnpm prisma migrate deploy", "migrate")
    assert c.render().endswith("run --rm --no-deps -T backend sh -c 'pnpm prisma migrate deploy'")


def test_gateway_reload_is_one_exec_that_reloads_only_a_config_that_passed_nginx_t():
    c = dk.nginx_test_and_reload("gw", "/etc/hd/nginx.conf")
    assert c.render() == ("docker exec gw sh -c 'nginx -t -q -c \"$1\" || exit 1; exec nginx -s reload -c \"$1\"' "
                          "sh /etc/hd/nginx.conf")


def test_probes_then_warm_requests_in_one_exec_only_after_every_probe_passed(tmp_path):
    """The script under a real sh, with a stand-in curl that logs the URLs it is asked for."""
    import os
    import subprocess

    curl = tmp_path / "curl"
    curl.write_text(f'#!/bin/sh\nfor a; do u=$a; done; echo "$u" >> {tmp_path}/asked\n'
                    'case "$u" in *bad*) exit 1;; esac\n')
    curl.chmod(0o755)

    def run(*urls, warm=()):
        (tmp_path / "asked").write_text("")
        c = dk.http_probes("gw", urls, then_warm=warm)
        assert c.intent == ("probes", *urls)  # the warm-up URLs are not probes
        argv = shlex.split(c.render())[3:]  # after "docker exec gw"
        out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
        return out.stdout.splitlines(), (tmp_path / "asked").read_text().split()

    assert run("http://a/ok", "http://b/ok", warm=("http://a/w", "http://a/w")) == (
        ["ok http://a/ok", "ok http://b/ok"], ["http://a/ok", "http://b/ok", "http://a/w", "http://a/w"])
    assert run("http://a/bad", "http://b/ok", warm=("http://a/w",)) == (
        ["fail http://a/bad", "ok http://b/ok"], ["http://a/bad", "http://b/ok"])
    assert run("http://a/ok") == (["ok http://a/ok"], ["http://a/ok"])


def test_facts_are_readonly_and_actions_are_not():
    assert host_facts("/srv/x").readonly and project_containers("p").readonly
    assert dk.http_probe("gw", "http://10.0.0.2:5000/health").readonly
    assert not dk.nginx_test_and_reload("gw", "/etc/nginx.conf").readonly
    assert not fs.switch_symlink("/srv/current", "releases/1").readonly


def test_checksum_wrapper_and_parser():
    wrapped = checksummed_stdout(cmd("pg_dump", "-Fc", "db"))
    assert wrapped.render().startswith("bash -c 'sha256_of_stdin() {") and "set -o pipefail" in wrapped.render()
    assert wrapped.render().endswith(" bash 'pg_dump -Fc db'")
    digest, rest = parse_checksum("warning: x\nHEALTHDEPLOY-SHA256 abc123\n")
    assert digest == "abc123" and rest == "warning: x"


def test_script_values_are_positional():
    c = script('echo "$1"', "a'b; rm -rf /", description="t")
    assert c.render() == "sh -c 'echo \"$1\"' sh 'a'\"'\"'b; rm -rf /'"


def test_redact():
    assert redact("url postgresql://u:s3cr3tpw@h/db", [Secret("s3cr3tpw")]) == "url postgresql://u:***@h/db"


def test_the_check_through_the_gateway_gives_a_reload_a_moment(tmp_path):
    """`nginx -s reload` only signals the master: the first request after it can reach an old worker. The probe
    after a switch is tried again (here curl fails twice, then answers); one that never answers still fails."""
    import os
    import shlex
    import subprocess

    words = shlex.split(dk.http_probe("gw", "http://127.0.0.1:5000/health", within=1).render())
    assert words[:3] == ["docker", "exec", "gw"] and words[-3:] == ["http://127.0.0.1:5000/health", "3", "5"]
    (tmp_path / "curl").write_text(f'#!/bin/sh\nn=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n\n'
                                   f'[ "$n" -ge "$FAIL_FIRST" ]\n')
    (tmp_path / "curl").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    assert subprocess.run(words[3:], env={**env, "FAIL_FIRST": "2"}).returncode == 0
    assert (tmp_path / "n").read_text().strip() == "3"
    (tmp_path / "n").unlink()
    assert subprocess.run(words[3:], env={**env, "FAIL_FIRST": "99"}, capture_output=True).returncode != 0
    assert (tmp_path / "n").read_text().strip() == "5"  # every attempt made, then the failure
    (tmp_path / "n").unlink()
    once = shlex.split(dk.http_probe("gw", "http://127.0.0.1:5000/health").render())
    assert subprocess.run(once[3:], env={**env, "FAIL_FIRST": "99"}, capture_output=True).returncode != 0
    assert (tmp_path / "n").read_text().strip() == "1"  # without ``within``: one attempt


def test_image_ids_is_one_docker_call_for_every_ref(tmp_path):
    """Command, sample output, parsed value: a stand-in ``docker`` records its argv and prints a listing."""
    import os
    import subprocess

    from deploy.facts.images import image_ids, parse_image_ids

    docker = tmp_path / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
                      "printf 'hd/p/backend:r2 sha256:bbb\\nhd/p/backend:r1 sha256:aaa\\n"
                      "127.0.0.1:5000/hd/p/web:r2 sha256:ccc\\n'\n")
    docker.chmod(0o755)
    refs = ("hd/p/backend:r2", "127.0.0.1:5000/hd/p/web:r2", "hd/p/ai-service:r2")
    argv = shlex.split(image_ids(refs).render())
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert parse_image_ids(out.stdout) == {"hd/p/backend:r2": "sha256:bbb", "127.0.0.1:5000/hd/p/web:r2": "sha256:ccc",
                                           "hd/p/ai-service:r2": None}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["images --no-trunc --format {{.Repository}}:{{.Tag}} {{.ID}} --filter reference=hd/p/backend:r2 "
                     "--filter reference=127.0.0.1:5000/hd/p/web:r2 --filter reference=hd/p/ai-service:r2"]
