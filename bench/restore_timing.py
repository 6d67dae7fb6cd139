"""Restore wall time of the sandbox set: deploy, seed 5,000 patients + 20,000 readings, back up postgres, influxdb and minio, time `inv restore --from latest` twice. Run from a checkout root: PYTHONPATH=. HEALTHDEPLOY_TEST_HOSTS=a,b,c python3 bench/restore_timing.py"""
import json, os, sys, time, subprocess
sys.path.insert(0, "tests/integration")
import pytest
from pathlib import Path
import sandbox_env
from sandbox_env import TEST_HOSTS, _cleanup, new_env
from deploy.sandbox import setup, images, hosts as sandbox

HOST = TEST_HOSTS[0]
class F:
    def __init__(self, base): self.base, self.n = Path(base), 0
    def mktemp(self, name):
        self.n += 1; p = self.base / f"{name}{self.n}"; p.mkdir(parents=True); return p

def main():
    import tempfile
    base = tempfile.mkdtemp(prefix="rt-")
    setup.ensure_machine(); images.build_all(); sandbox.up(list(TEST_HOSTS), install=False)
    env = new_env(F(base), "rt")
    extra = dict(a.split("=", 1) for a in sys.argv[1:])
    env.write(hosts=HOST, COMPOSE_PROJECT="hd-bench-{env}-{host}", **extra)
    sandbox.remove_project(f"hd-bench-rt-{HOST}")
    home = Path(base) / "home"; home.mkdir()
    run = lambda *a: env.run(*a, extra_env={"HEALTHDEPLOY_HOME": str(home)})
    p = env.fab("deploy", hosts=HOST); assert p.returncode == 0, p.stderr
    pg = f"hd-bench-rt-{HOST}-postgres-1"
    sql = lambda q: subprocess.run(["docker", "exec", pg, "psql", "-X", "-U", "admin", "-d", "health_mgmt", "-tAc", q], check=True, capture_output=True, text=True).stdout
    sql("INSERT INTO patients(mrn, full_name) SELECT 'MRN' || g, 'patient ' || g FROM generate_series(1, 5000) g")
    sql("CREATE TABLE readings (id serial PRIMARY KEY, patient int, sys int, note text)")
    sql("INSERT INTO readings(patient, sys, note) SELECT g % 97, 100 + g % 60, repeat('x', g % 50) FROM generate_series(1, 20000) g")
    p = run("inv", "backup", "--env", "rt", "--services", "postgres,influxdb,minio"); assert p.returncode == 0, p.stderr
    times = []
    for i in range(2):
        t = time.monotonic()
        p = run("inv", "restore", "--env", "rt", "--from", "latest", "--yes", *(["--services", "postgres,influxdb,minio"]))
        times.append(round(time.monotonic() - t, 1))
        assert p.returncode == 0, p.stderr[-3000:]
    print(json.dumps({"restore_seconds": times}))
    sandbox.remove_project(f"hd-bench-rt-{HOST}")
main()
