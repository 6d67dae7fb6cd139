"""The sandbox's sample application, deployed by `fab deploy`: the frontends are nginx serving a
built SPA with the production config, the backend reads and writes PostgreSQL and Redis (and
fails with 5xx when it cannot), WebSockets pass the gateway, and a control run with no deploy loses
no request while the machine is busy.

The tests share one deployed stack and run in order; each puts back what it breaks.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from load import Load, WebSocketClient
from sandbox_env import MAIN, MAIN_ADDRESS, _cleanup, new_env

HOST = MAIN_ADDRESS
PROJECT = f"hd-tapp-{MAIN}"
REDIS_PASSWORD = "sandbox-redis-51d2"  # env/sandbox.env


@pytest.fixture(scope="module")
def env(sandbox_hosts, tmp_path_factory):
    env = new_env(tmp_path_factory, "app")
    _cleanup(env)
    proc = env.fab("deploy")
    assert proc.returncode == 0, proc.stderr
    yield env
    _cleanup(env)


def request(method: str, port: int, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) without raising on 4xx/5xx."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def api(method: str, port: int, path: str, body: bytes | None = None):
    status, _, data = request(method, port, path, body, {"Content-Type": "application/json"})
    return status, json.loads(data)


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def container(service: str) -> str:
    ids = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 "--filter", f"label=com.docker.compose.service={service}").split()
    assert len(ids) == 1, (service, ids)
    return ids[0]


def psql(sql: str) -> str:
    return docker("exec", container("postgres"), "psql", "-U", "admin", "-d", "health_mgmt", "-tAc", sql)


def redis_cli(password: str, *args: str) -> str:
    return docker("exec", "-e", f"REDISCLI_AUTH={password}", container("redis"), "redis-cli", *args)


def listen_backlog(service: str, port: int) -> int:
    """Send-Q of the listening socket, seen from inside the container's network namespace."""
    pid = docker("inspect", "--format", "{{.State.Pid}}", container(service))
    out = subprocess.run(["nsenter", "-t", pid, "-n", "ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[2])


def wait_until(check, timeout: float = 30, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_the_api_reads_and_writes_postgresql_through_the_gateway(env):
    before = int(psql("SELECT count(*) FROM requests"))
    ids = []
    for port in (5000, 3000, 3001):  # the backend's own site, and /api/ of both frontend sites
        status, body = api("POST", port, "/api/echo", b'{"hello": "world"}')
        assert status == 200 and body["service"] == "backend" and body["received"] == 18, body
        ids.append(body["id"])
    assert int(psql("SELECT count(*) FROM requests")) == before + 3  # each 200 is a committed row
    assert psql(f"SELECT count(*) FROM requests WHERE id IN ({','.join(map(str, ids))}) AND path = '/api/echo'") == "3"
    psql("INSERT INTO patients (mrn, full_name) VALUES ('MRN-APP-1', '张三') ON CONFLICT DO NOTHING")
    status, first = api("GET", 5000, "/api/build")
    assert status == 200 and first["build"] == "backend-v1" and first["release"]
    assert first["patients"] == int(psql("SELECT count(*) FROM patients")) >= 1
    assert first["last_request_id"] == max(ids)
    status, second = api("GET", 3000, "/api/build")
    assert status == 200 and second["hits"] == first["hits"] + 1  # a Redis INCR per GET
    assert int(redis_cli(REDIS_PASSWORD, "GET", "hits:backend")) == second["hits"]
    status, ready = api("GET", 5000, "/ready")
    assert status == 200 and ready["db"] == ready["schema"] == ready["redis"] == "ok"
    assert api("GET", 5000, "/health")[1]["db"] == "ok"


def test_keepalive_clients_through_the_gateway(env):
    with Load(HOST, 5000, rate=100, workers=8, keepalive=True) as load:
        time.sleep(3)
    assert load.result.failed == 0, load.result.errors[:5]
    assert load.result.total > 200 and load.result.connections == 8  # persistent: one per worker


@pytest.mark.parametrize("port, service", [(3000, "frontend-web"), (3001, "frontend-patient")])
def test_a_frontend_is_nginx_serving_the_built_spa(env, port, service):
    build = (env.app / service / "build_id").read_text().strip()
    status, response, page = request("GET", port, "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert response.getheader("Cache-Control") == "no-cache"  # index.html is always revalidated
    assert f'<meta name="healthdeploy-build" content="{build}">'.encode() in page
    assets = re.findall(rb'(?:src|href)="(/assets/app\.[0-9a-f]{8}\.(?:js|css))"', page)
    assert len(assets) == 2, page
    for asset in assets:
        status, response, data = request("GET", port, asset.decode())
        assert status == 200 and data
        cache = ", ".join(v for k, v in response.getheaders() if k.lower() == "cache-control")
        assert "max-age=31536000" in cache and "immutable" in cache, cache
        assert response.getheader("Expires")
    js = next(a for a in assets if a.endswith(b".js")).decode()
    assert f'"{build}"'.encode() in request("GET", port, js)[2]  # the build id is compiled in
    assert request("GET", port, "/assets/app.00000000.js")[0] == 404  # unknown asset: no SPA fallback
    status, _, routed = request("GET", port, "/patients/42/readings")  # a client-side route
    assert status == 200 and routed == page
    status, _, health = request("GET", port, "/health")
    assert (status, health) == (200, b"ok\n")
    status, info = api("GET", port, "/build.json")
    assert status == 200 and info["service"] == service and info["build"] == build
    assert set(info["assets"]) == {a.decode() for a in assets}
    # Inside: nginx as uid 1001, the kernel's default backlog of nginx (511), graceful stop signal.
    cid = container(service)
    top = docker("top", cid, "-o", "pid,uid,args")
    assert "nginx: master process" in top and "nginx: worker process" in top, top
    assert all(line.split()[1] == "1001" for line in top.splitlines()[1:]), top
    assert listen_backlog(service, 80) == 511
    assert docker("inspect", "--format", "{{.Config.StopSignal}}", cid) == "SIGQUIT"
    assert docker("inspect", "--format", "{{.State.Health.Status}}", cid) == "healthy"


def test_the_python_services_listen_with_a_realistic_backlog(env):
    assert listen_backlog("backend", 5000) == 1024
    assert listen_backlog("ai-service", 8001) == 1024


@pytest.mark.parametrize("port", [5000, 3000])
def test_a_websocket_through_the_gateway_gets_hello_and_echoes(env, port):
    client = WebSocketClient(HOST, port, "/socket.io/?EIO=4&transport=websocket").connect()
    try:
        hello = client.recv_json(timeout=5)
        assert hello["type"] == "hello" and hello["service"] == "backend" and hello["build"] == "backend-v1"
        for n in range(3):
            client.send_text(f"ping {n}")
            assert client.recv_text(timeout=5) == f"ping {n}"
        # The drain counters are on the container network only: not through the gateway ...
        assert request("GET", 5000, "/internal/connections")[0] == 404
        # ... but from the gateway container straight to the backend.
        ip = docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container("backend"))
        counts = json.loads(docker("exec", container("gateway"), "curl", "-fsS", f"http://{ip}:5000/internal/connections"))
        assert counts["websockets"] == 1 and counts["behaviour"] == "polite"
    finally:
        client.close()
    assert client.outcome == "close" and client.close_code == 1000


def test_a_missing_table_answers_5xx(env):
    psql("ALTER TABLE requests RENAME TO requests_hidden")
    try:
        status, body = api("GET", 5000, "/api/build")
        assert status == 500 and 'relation "requests" does not exist' in body["error"], body
        status, body = api("POST", 3000, "/api/echo", b"{}")
        assert status == 500 and 'relation "requests" does not exist' in body["error"], body
        assert api("GET", 5000, "/ready")[0] == 503
        status, health = api("GET", 5000, "/health")
        assert status == 200 and health["db"] == "ok"  # reachable: the deploy's health gate is not this
    finally:
        psql("ALTER TABLE requests_hidden RENAME TO requests")
    assert api("GET", 5000, "/api/build")[0] == 200 and api("POST", 5000, "/api/echo", b"{}")[0] == 200


def test_an_unreachable_database_answers_5xx_and_the_pool_reconnects(env):
    assert api("POST", 5000, "/api/echo", b"{}")[0] == 200  # the pool holds live connections now
    postgres = container("postgres")
    docker("stop", postgres)
    try:
        status, body = api("GET", 5000, "/api/build")
        assert status == 503 and "database unavailable" in body["error"], body
        assert api("POST", 5000, "/api/echo", b"{}")[0] == 503
        assert api("GET", 5000, "/ready")[0] == 503
        health = wait_until(lambda: (lambda s, b: b if b.get("db") == "fail" else None)(*api("GET", 5000, "/health")), 10)
        assert health and health["status"] == "ok", health  # /health itself stays 200
        assert docker("inspect", "--format", "{{.State.Health.Status}}", container("backend")) == "healthy"
    finally:
        docker("start", postgres)
    assert wait_until(lambda: api("GET", 5000, "/api/build")[0] == 200, 60), "the backend did not reconnect"
    assert api("POST", 5000, "/api/echo", b"{}")[0] == 200
    assert wait_until(lambda: api("GET", 5000, "/health")[1]["db"] == "ok", 10)


def test_refused_redis_credentials_answer_5xx(env):
    redis_cli(REDIS_PASSWORD, "CONFIG", "SET", "requirepass", "rotated-elsewhere")
    try:
        redis_cli("rotated-elsewhere", "CLIENT", "KILL", "TYPE", "normal")  # the pool must log in again
        status, body = api("GET", 5000, "/api/build")
        assert status == 500 and "redis refused the credentials" in body["error"], body
        assert api("GET", 5000, "/ready")[0] == 503
        assert api("POST", 5000, "/api/echo", b"{}")[0] == 200  # writes need only PostgreSQL
    finally:
        redis_cli("rotated-elsewhere", "CONFIG", "SET", "requirepass", REDIS_PASSWORD)
    assert wait_until(lambda: api("GET", 5000, "/api/build")[0] == 200, 10)


def cpu_hogs(n: int, seconds: float) -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def test_control_run_without_deploy_under_cpu_load_fails_no_request(env):
    """100 req/s for 20 s on the backend and on frontend-web at once, 4 busy processes on the machine."""
    assert wait_until(lambda: docker("inspect", "--format", "{{.State.Health.Status}}", container("redis")) == "healthy", 30)
    hogs = cpu_hogs(4, 25)
    try:
        time.sleep(1)
        with Load(HOST, 5000, rate=100) as backend, Load(HOST, 3000, rate=100, path="/", post_path=None) as web:
            time.sleep(20)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    report = {name: {"failed": load.result.failed, "total": load.result.total, "p99_ms": round(load.result.p99_ms()),
                     "errors": sorted(set(load.result.errors))[:5]}
              for name, load in (("backend (GET /api/build + POST /api/echo)", backend), ("frontend-web (GET /)", web))}
    print("control run under CPU load:", json.dumps(report, ensure_ascii=False, indent=1))
    assert backend.result.total > 1500 and web.result.total > 1500, report
    assert backend.result.failed == 0 and web.result.failed == 0, report


def slow_get(results: list, ms: int) -> None:
    try:
        results.append(request("GET", 5000, f"/api/slow?ms={ms}")[0])
    except Exception as exc:
        results.append(type(exc).__name__)


@pytest.mark.parametrize("behaviour", ["polite", "rude"])
def test_sigterm_behaviour_seen_through_the_gateway(env, behaviour):
    """Last: the backend container is signalled (and restarted by its restart policy)."""
    backend = container("backend")
    ip_format = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    ip = docker("inspect", "--format", ip_format, backend)
    docker("exec", backend, "sh", "-c", f"echo {behaviour} > /app/service/behaviour")
    client = WebSocketClient(HOST, 5000).connect()
    client.recv_json(timeout=5)
    client.watch()
    results: list = []
    slow = threading.Thread(target=slow_get, args=(results, 1500))
    slow.start()
    time.sleep(0.5)
    started = docker("inspect", "--format", "{{.State.StartedAt}}", backend)
    # What `docker stop` sends first, to PID 1 (init: true forwards it to the app). Not `docker kill`:
    # that counts as a manual stop, and the restart policy would not bring the container back.
    docker("exec", backend, "sh", "-c", "kill -TERM 1")
    slow.join(15)
    assert client.ended.wait(10)
    if behaviour == "polite":
        assert results == [200]  # the in-flight request was drained
        assert (client.outcome, client.close_code, client.close_reason) == ("close", 1001, "going away")
    else:
        assert results == [502]  # cut mid-request; the gateway has nobody else to ask
        assert client.outcome in ("eof", "reset") and client.close_code is None
    logs = docker("logs", "--tail", "30", backend)
    assert ("shutting down (polite)" if behaviour == "polite" else "SIGTERM (rude)") in logs, logs
    # restart: unless-stopped brings it back (same container, so the behaviour file is still there).
    def restarted_and_healthy():
        state = docker("inspect", "--format", "{{.State.StartedAt}} {{.State.Health.Status}}", backend).split()
        return state[0] != started and state[1] == "healthy"

    assert wait_until(restarted_and_healthy, 30)
    docker("exec", backend, "rm", "-f", "/app/service/behaviour")
    if docker("inspect", "--format", ip_format, backend) != ip:  # a new address: the gateway must learn it
        proc = env.fab("deploy")
        assert proc.returncode == 0 and "repairing" in proc.stderr, proc.stderr
