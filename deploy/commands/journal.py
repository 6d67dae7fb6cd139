"""The undo journal: what an operation must undo if it does not finish, kept ON THE HOST, inside the lock.

Every undo action is a command line, written to ``<lock>/undo/<phase><seq>.sh`` BEFORE the change it undoes.
On a failure the operation runs the journal itself (``journal_run``). If the operator's process dies (SIGKILL,
a crash, a machine gone) or its connection drops, nothing local can undo anything: the lock's holder process
on the host notices its channel closing without a clean release and runs the same journal, then releases the
lock. So a host is left serving its old release completely whatever happens to the operator.

Phases run in order (settings the old containers need, then services, then files), each newest first.
"""

from __future__ import annotations

from .base import Command, script

# $1 lock dir, $2 entry name, $3 description, $4 the command line to run. Written atomically.
JOURNAL_ADD = r"""set -e
# Never recreates a lock that is gone (its holder undid and released it: this operation lost its lock).
[ -d "$1" ] || { echo "the lock $1 is gone: another process released it" >&2; exit 3; }
d="$1/undo"; mkdir -p "$d"
umask 077
printf '# %s\n%s\n' "$3" "$4" > "$d/.$2.tmp"
mv -f "$d/.$2.tmp" "$d/$2.sh"
"""

# Runs every entry, phase by phase, newest first within a phase; one result line per entry; an entry that
# fails does not stop the others. Each entry is removed once it ran (a second run does not repeat it).
RUN_JOURNAL_FUNCTION = r"""run_journal() {
d="$1/undo"
[ -d "$d" ] || return 0
for phase in 0 1 2; do
  for f in $(ls -1 "$d" 2>/dev/null | grep "^$phase.*\.sh$" | sort -r); do
    what=$(sed -n '1s/^# //p' "$d/$f")
    if out=$(sh "$d/$f" 2>&1 </dev/null); then echo "undone $what"
    else echo "failed $what: $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"; fi
    rm -f "$d/$f"
  done
done
}
"""
JOURNAL_RUN = RUN_JOURNAL_FUNCTION + 'run_journal "$1"\nexit 0\n'

JOURNAL_CLEAR = 'rm -rf -- "$1/undo"'


def entry_name(phase: int, seq: int) -> str:
    return f"{phase}{seq:04d}"


def journal_add(lock_dir: str, phase: int, seq: int, description: str, undo: Command) -> Command:
    return script(JOURNAL_ADD, lock_dir, entry_name(phase, seq), description, undo.render(),
                  description="record an undo step", intent=("journal-add", phase, seq, description, undo))


def journal_run(lock_dir: str) -> Command:
    return script(JOURNAL_RUN, lock_dir, description="undo", intent=("journal-run",), timeout=1800)


def journal_clear(lock_dir: str) -> Command:
    return script(JOURNAL_CLEAR, lock_dir, description="commit (clear the undo journal)", intent=("journal-clear",))


def parse_journal_run(text: str) -> list[tuple[str, str]]:
    """``[(description, "undone" | "failed: why")]`` from what journal_run printed."""
    out = []
    for line in text.splitlines():
        if line.startswith("undone "):
            out.append((line[len("undone "):], "undone"))
        elif line.startswith("failed "):
            what, _, why = line[len("failed "):].partition(": ")
            out.append((what, f"failed: {why.strip()}"))
    return out


# A service's old containers back in the gateway: they are started again (a roll stops them but keeps them
# until the deploy commits), become healthy, the upstream lists them, nginx reloads, the new ones go. Done
# with the old containers already serving, it changes nothing.
# $1 gateway container, $2 upstream file, $3 upstream name, $4 port, $5 nginx conf, $6 health timeout (s),
# $7 release (comment), then the old ids, "--", the new ids.
ROLL_BACK = r"""set -e
gw="$1"; file="$2"; name="$3"; port="$4"; conf="$5"; wait_s="$6"; release="$7"; shift 7
old=""; while [ $# -gt 0 ] && [ "$1" != -- ]; do old="$old $1"; shift; done
[ "${1:-}" = -- ] && shift
new="$*"
[ -n "$old" ] || exit 0
docker start $old >/dev/null
i=0
while :; do
  bad=0
  for c in $old; do
    s=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")
    case "$s" in "running healthy"|"running ") ;; *) bad=1 ;; esac
  done
  [ "$bad" = 0 ] && break
  i=$((i + 1)); [ "$i" -lt $((wait_s * 2)) ] || { echo "old containers not healthy again after ${wait_s}s" >&2; exit 1; }
  sleep 0.5
done
servers=""
for c in $old; do
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$c" | awk '{print $1}')
  servers="$servers    server $ip:$port max_fails=0;
"
done
tmp=$(mktemp "$file.XXXXXX")
printf '# %s: put back by healthdeploy (undo) for release %s.\nupstream %s {\n%s    keepalive 16;\n}\n' \
  "$name" "$release" "$name" "$servers" > "$tmp"
chmod 0644 "$tmp"; mv -f "$tmp" "$file"
docker exec "$gw" nginx -t -q -c "$conf"
docker exec "$gw" nginx -s reload -c "$conf"
sleep 2
[ -z "$new" ] || docker rm -f -v $new >/dev/null 2>&1 || true
"""


def roll_back(gateway: str, upstream_file: str, upstream_name: str, port: int, conf: str, wait_s: int, release: str,
              old: tuple[str, ...], new: tuple[str, ...]) -> Command:
    """Undo of one service's roll (see ROLL_BACK)."""
    return script(ROLL_BACK, gateway, upstream_file, upstream_name, str(port), conf, str(wait_s), release, *old, "--",
                  *new, description="put the old containers back in the gateway",
                  intent=("roll-back", upstream_name, old, new), timeout=wait_s + 120)
