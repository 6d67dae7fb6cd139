#!/usr/bin/env python3
"""Print a test run's timeline (HEALTHDEPLOY_TEST_TIMELINE, see tests/conftest.py) as one row per worker and
module: when it started after the first test, how long it ran, how many tests. Usage: timeline.py FILE"""

import json
import sys


def rows(lines):
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        return []
    origin = min(r["start"] for r in records)
    modules: dict = {}
    for r in records:
        key = (r["worker"], r["id"].split("::")[0])
        first, last, count = modules.get(key, (r["start"], r["end"], 0))
        modules[key] = (min(first, r["start"]), max(last, r["end"]), count + 1)
    return sorted(((w, m, round(a - origin), round(b - a), n) for (w, m), (a, b, n) in modules.items()),
                  key=lambda row: (row[0], row[2]))


def main(path: str) -> int:
    with open(path) as f:
        table = rows(f)
    print("| worker | module | started at (s) | seconds | tests |\n|---|---|---|---|---|")
    for worker, module, start, seconds, count in table:
        print(f"| {worker} | {module} | {start} | {seconds} | {count} |")
    for worker in sorted({row[0] for row in table}):
        print(f"{worker}: done at {max(r[2] + r[3] for r in table if r[0] == worker)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
