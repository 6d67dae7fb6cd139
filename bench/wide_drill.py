"""2,000-table PostgreSQL drill on the sandbox (run from the checkout root, PYTHONPATH=. HEALTHDEPLOY_TEST_HOSTS=...)."""
import json, sys, time, subprocess, tempfile
sys.path.insert(0, "tests/integration")
from pathlib import Path
from sandbox_env import TEST_HOSTS, new_env
from deploy.sandbox import hosts as sandbox

HOST = TEST_HOSTS[2]
class F:
    def __init__(self, base): self.base, self.n = Path(base), 0
    def mktemp(self, name):
        self.n += 1; p = self.base / f"{name}{self.n}"; p.mkdir(parents=True); return p
base = tempfile.mkdtemp(prefix="wide-")
env = new_env(F(base), "wd")
env.write(hosts=HOST, COMPOSE_PROJECT="hd-bench-{env}-{host}")
project = f"hd-bench-wd-{HOST}"
sandbox.remove_project(project)
home = Path(base) / "home"; home.mkdir()
run = lambda *a: env.run(*a, extra_env={"HEALTHDEPLOY_HOME": str(home)}, timeout=1800)
p = env.fab("deploy", hosts=HOST, timeout=1800); assert p.returncode == 0, p.stderr[-2000:]
sql = lambda q: subprocess.run(["docker", "exec", f"{project}-postgres-1", "psql", "-X", "-U", "admin", "-d", "health_mgmt", "-tAc", q], check=True, capture_output=True, text=True).stdout
sql("CREATE SCHEMA wide")
sql("DO $$ BEGIN FOR i IN 1..2000 LOOP EXECUTE format('CREATE TABLE wide.t%s (id int)', i); EXECUTE format('INSERT INTO wide.t%s SELECT generate_series(1, %s)', i, i % 5); END LOOP; END $$")
p = run("inv", "backup", "--env", "wd", "--services", "postgres"); assert p.returncode == 0, p.stderr[-2000:]
s = sorted(x for x in (home / "backups" / "wd").iterdir() if not x.name.startswith("."))[-1]
rows = json.loads((s / "manifest.json").read_text())["artifacts"][0]["rows"]
t = time.monotonic()
p = run("inv", "backup.verify", "--env", "wd", "--from", s.name, "--json")
secs = time.monotonic() - t
report = json.loads(p.stdout) if p.returncode == 0 else {}
print(json.dumps({"tables_recorded": len(rows), "wide_tables": len([k for k in rows if k.startswith("wide.")]),
                  "drill_exit": p.returncode, "result": report.get("result"),
                  "tables_compared": len(report.get("checks", [{}])[0].get("tables", {})) if report else 0,
                  "mismatches": report.get("checks", [{}])[0].get("mismatches") if report else p.stderr[-500:],
                  "drill_seconds": round(secs, 1)}))
sandbox.remove_project(project)
