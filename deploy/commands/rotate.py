"""Credential rotation on running data servers. Each reads the credentials from secret env files ON THE HOST
(the new version, and for Redis also the old one), fed to the container on stdin: no password is ever an
argument of a command (the host's ``ps`` shows those) nor typed into a script.
"""

from __future__ import annotations

from .base import Command, script

# $1 container, $2 the env file holding the password to set. psql gets the statement on stdin (printf is
# a shell builtin).
POSTGRES_SET_PASSWORD = r"""set -e
docker exec -i "$1" sh -c 'set -a; . /dev/stdin; set +a
printf "ALTER ROLE \"%s\" PASSWORD '"'"'%s'"'"';\n" "$POSTGRES_USER" "$POSTGRES_PASSWORD" | psql -X -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres' < "$2"
"""


def postgres_set_password(container: str, env_file: str) -> Command:
    return script(POSTGRES_SET_PASSWORD, container, env_file, description="set the PostgreSQL password",
                  intent=("rotate", "postgres", env_file))


# Redis: $2 the env file with the password now in force (to authenticate), $3 the one with the new password.
# `add` lets the default user accept both until `finish` leaves only the new one.
REDIS_PASSWORDS = r"""set -e
{ sed -n "s/^REDIS_PASSWORD=/OLD=/p" "$2"; sed -n "s/^REDIS_PASSWORD=/NEW=/p" "$3"; } |
docker exec -i "$1" sh -c 'set -a; . /dev/stdin; set +a
if [ "$0" = add ]; then rule="on >$NEW"; else rule="on resetpass >$NEW"; fi
printf "ACL SETUSER default %s\n" "$rule" | REDISCLI_AUTH="$OLD" redis-cli -h 127.0.0.1 | grep -qx OK' "$4"
"""


def redis_add_password(container: str, current_file: str, new_file: str) -> Command:
    return script(REDIS_PASSWORDS, container, current_file, new_file, "add",
                  description="let Redis accept the new password too", intent=("rotate-prepare", "redis", new_file))


def redis_only_password(container: str, current_file: str, new_file: str) -> Command:
    return script(REDIS_PASSWORDS, container, current_file, new_file, "finish",
                  description="let Redis accept only the new password", intent=("rotate-finish", "redis", new_file))


MONGO_SET_PASSWORD = r"""set -e
docker exec -i "$1" sh -c 'set -a; . /dev/stdin; set +a
umask 077; c=$(mktemp); trap "rm -f $c" EXIT
printf "db.getSiblingDB(\"admin\").changeUserPassword(\"%s\", \"%s\")\n" "$MONGO_INITDB_ROOT_USERNAME" "$MONGO_INITDB_ROOT_PASSWORD" > "$c"
mongosh --quiet admin "$c"' < "$2"
"""


def mongo_set_password(container: str, env_file: str) -> Command:
    return script(MONGO_SET_PASSWORD, container, env_file, description="set the MongoDB password",
                  intent=("rotate", "mongodb", env_file))
