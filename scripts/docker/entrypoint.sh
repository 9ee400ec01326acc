#!/bin/sh
# Minimal stand-in for the official postgres image's docker-entrypoint.sh,
# enough for testcontainers' PostgresContainer:
#   - on an empty PGDATA, initdb with POSTGRES_USER / POSTGRES_PASSWORD,
#     trust for local (socket) connections, scram-sha-256 (or
#     POSTGRES_HOST_AUTH_METHOD) for TCP from anywhere, listen_addresses='*';
#   - create POSTGRES_DB (default: the user name) unless it is "postgres",
#     as the official image does;
#   - then exec the command ("postgres ..." gets "-D $PGDATA" unless given).
# Works as user postgres (the image default) or as root (drops to postgres).
# Not supported: /docker-entrypoint-initdb.d, POSTGRES_INITDB_ARGS, *_FILE vars.
set -eu

PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA
POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-}"
POSTGRES_HOST_AUTH_METHOD="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"

err() { echo "entrypoint: ERROR: $*" >&2; exit 1; }

# "docker run IMAGE -c fsync=off" -> "postgres -c fsync=off"
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi

if [ "$1" != postgres ]; then
    exec "$@"
fi

# Running as root (e.g. `docker run --user root`): fix ownership, drop privileges.
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 3777 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

mkdir -p "$PGDATA" 2>/dev/null || true
[ -w "$PGDATA" ] || err "$PGDATA is not writable by $(id -un) (uid $(id -u))"
chmod 700 "$PGDATA" 2>/dev/null || true

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        err "database is uninitialized and POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)"
    fi
    echo "entrypoint: initializing $PGDATA for user $POSTGRES_USER"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    pwopt="--pwfile=$pwfile"
    [ -n "$POSTGRES_PASSWORD" ] || pwopt=""
    # shellcheck disable=SC2086  # $pwopt is intentionally empty or one word
    initdb -D "$PGDATA" --username="$POSTGRES_USER" $pwopt \
        --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host="$POSTGRES_HOST_AUTH_METHOD" >/dev/null
    rm -f "$pwfile"

    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"

    if [ "$POSTGRES_DB" != postgres ]; then
        echo "entrypoint: creating database $POSTGRES_DB"
        dbident=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
        userident=$(printf '%s' "$POSTGRES_USER" | sed 's/"/""/g')
        printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$dbident" "$userident" |
            postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "entrypoint: initialization done"
fi

shift
case " $* " in
    *" -D "*|*" -D"*) exec postgres "$@" ;;
    *) exec postgres -D "$PGDATA" "$@" ;;
esac
