#!/usr/bin/env bash
# A private PostgreSQL cluster for ASR Fleet, under the project's state dir, on a Unix socket only.
#
#   scripts/pg-local.sh start  [STATE_DIR]   create on first use (initdb, database "asrf"), then start
#   scripts/pg-local.sh stop   [STATE_DIR]   fast shutdown
#   scripts/pg-local.sh status [STATE_DIR]   exit 0 when running
#   scripts/pg-local.sh url    [STATE_DIR]   one line usable by psql and by --pg / ASRF_PG
#
# STATE_DIR defaults to $ASRF_STATE_DIR, else asrf-state/ in the repository. Data lives in
# STATE_DIR/pg/data, the log in STATE_DIR/pg/postgres.log. No TCP: listen_addresses is empty and
# the socket directory is private (0700). Unix socket paths must stay under 107 bytes, so when
# STATE_DIR/pg/sock would be too long the socket goes to /tmp/asrf-pg-<hash> instead.
# As root the server runs as the `postgres` user (initdb refuses root); otherwise as the caller.
# Authentication is `trust` on that private socket: only its owner (and root) can reach it.
set -euo pipefail

cmd="${1:-}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${2:-${ASRF_STATE_DIR:-$repo/asrf-state}}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
pgdir="$state/pg"
data="$pgdir/data"
log="$pgdir/postgres.log"
port="${ASRF_PG_PORT:-5432}"
db=asrf

bindir=""
for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/pg_ctl" ]] && bindir="$d"; done
[[ -n "$bindir" ]] || { echo "pg-local: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }

sock="$pgdir/sock"
if (( ${#sock} > 90 )); then
    sock="/tmp/asrf-pg-$(printf '%s' "$state" | md5sum | cut -c1-12)"
fi

as_owner() {
    if [[ "$(id -u)" -eq 0 ]]; then
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}

# The socket path percent-encoded where a URI needs it (spaces, %, &, #, ?).
url() {
    local host
    host="$(sed -e 's/%/%25/g' -e 's/ /%20/g' -e 's/&/%26/g' -e 's/#/%23/g' -e 's/?/%3F/g' <<<"$sock")"
    printf 'postgresql:///%s?host=%s&port=%s&user=postgres\n' "$db" "$host" "$port"
}

running() { [[ -f "$data/PG_VERSION" ]] && as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; }

start() {
    mkdir -p "$pgdir" "$sock"
    if [[ "$(id -u)" -eq 0 ]]; then
        # The server runs as postgres: it must reach its directories. A parent it cannot search
        # (e.g. /root, 0700 on Debian, when the repository is cloned there) is made searchable by
        # others (o+x: passing through, not listing), and said so.
        local d="$state"
        while [[ "$d" != / ]]; do
            if ! su postgres -s /bin/sh -c "test -x $(printf '%q' "$d")"; then
                chmod o+x "$d"
                echo "pg-local: made $d searchable by other users (o+x) so the postgres user reaches $pgdir" >&2
            fi
            d="$(dirname "$d")"
        done
        chown postgres: "$pgdir" "$sock"
    fi
    chmod 0700 "$sock"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        echo "pg-local: creating a cluster in $data" >&2
        as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --no-instructions >"$pgdir/initdb.log" 2>&1 ||
            { cat "$pgdir/initdb.log" >&2; exit 1; }
    fi
    if running; then
        echo "pg-local: already running ($(url))" >&2
        return 0
    fi
    as_owner "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 \
        -o "-p $port -k '$sock' -c listen_addresses= -c unix_socket_permissions=0700" start >/dev/null ||
        { tail -n 20 "$log" >&2; exit 1; }
    if ! as_owner "$bindir/psql" -h "$sock" -p "$port" -U postgres -d postgres -Atqc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        as_owner "$bindir/createdb" -h "$sock" -p "$port" -U postgres "$db"
    fi
    echo "pg-local: running ($(url))" >&2
}

case "$cmd" in
    start) start ;;
    stop)
        if running; then as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null; fi
        echo "pg-local: stopped" >&2 ;;
    status)
        if running; then echo "running: $(url)"; else echo "not running"; exit 3; fi ;;
    url) url ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
