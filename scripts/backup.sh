#!/usr/bin/env bash
# Backs up ASR Fleet: the PostgreSQL database and a consistent copy of the broker's journal.
#
#   scripts/backup.sh [--out DIR] [--keep N] [--pg URL] [--http HOST:PORT] [--state-dir DIR]
#                     [--no-journal | --no-pg]
#
# One backup is three entries in the output directory, named by one UTC time stamp T
# (e.g. 20250102T030405Z):
#   asrf-T.dump       pg_dump -Fc of the database (put back with scripts/restore.sh)
#   journal-T/        a copy of the broker's RocksDB journal (its state dir's journal/)
#   asrf-T.manifest   what was taken and how, and the sha256 of every file
#                     (check: cd DIR && sha256sum -c asrf-T.manifest)
# The manifest is written last: entries without one are an incomplete backup and do not count.
#
# The journal is taken first, then the database. Job history moves from the journal to the jobs
# table and is then erased from the journal, so in this order every history record is in one or
# both (a restored broker sends the rest again; the upserts are ordered, so that is harmless).
# While a broker holds the journal (its lock) the copy is a RocksDB checkpoint made by the broker
# itself (POST /admin/journal-checkpoint on its HTTP address, loopback only) into a staging
# directory inside its own state dir, where a systemd broker may write, then moved here. When no
# broker holds it, the journal is copied with cp -a, and the script says so.
#
# Options (defaults from the environment):
#   --out DIR          where backups go: $ASRF_BACKUP_DIR, else STATE_DIR/backups
#   --keep N           keep the newest N complete backups there, delete older ones
#                      ($ASRF_BACKUP_KEEP, else 7; 0 keeps every one)
#   --pg URL           the database: $ASRF_PG, else `scripts/pg-local.sh url STATE_DIR`. Never a
#                      password in it: use PGPASSFILE or PGPASSWORD
#   --http HOST:PORT   the broker's HTTP address: by default the one it wrote to
#                      BROKER_DIR/http.endpoint, else $ASRF_HTTP, else 127.0.0.1:9100
#   --state-dir DIR    the fleet's state root, whose broker/journal is the journal
#                      ($ASRF_STATE_DIR, else asrf-state/ in the repository; systemd: /var/lib/asr-fleet).
#                      A broker state dir with journal/ directly inside works too
#   --no-journal       the database only (e.g. the broker runs on another host)
#   --no-pg            the journal only (a fleet without PostgreSQL)
#
# Exit status: 0 done, 1 failed (nothing half-written is left under a final name), 2 usage error.
set -euo pipefail

usage() { sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { echo "backup: $*"; }
die() { echo "backup: error: $*" >&2; exit 1; }
usage_error() { echo "backup: $*" >&2; echo "run scripts/backup.sh --help for the options" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${ASRF_BACKUP_DIR:-}"
keep="${ASRF_BACKUP_KEEP:-7}"
pg="${ASRF_PG:-}"
http=""
state="${ASRF_STATE_DIR:-$repo/asrf-state}"
do_journal=1
do_pg=1

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }
while (($#)); do
    case "$1" in
        --out) need_value "$@"; out="$2"; shift 2 ;;
        --keep) need_value "$@"; keep="$2"; shift 2 ;;
        --pg) need_value "$@"; pg="$2"; shift 2 ;;
        --http) need_value "$@"; http="$2"; shift 2 ;;
        --state-dir) need_value "$@"; state="$2"; shift 2 ;;
        --out=*|--keep=*|--pg=*|--http=*|--state-dir=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --no-journal) do_journal=0; shift ;;
        --no-pg) do_pg=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done
[[ "$keep" =~ ^[0-9]+$ ]] || usage_error "--keep must be a whole number, not '$keep'"
((do_journal || do_pg)) || usage_error "--no-journal and --no-pg together leave nothing to back up"

[[ "$state" == /* ]] || state="$PWD/$state"
[[ -n "$out" ]] || out="$state/backups"
[[ "$out" == /* ]] || out="$PWD/$out"

# Everything written here holds the fleet's data: owner only.
umask 077

for tool in sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

if ((do_pg)); then
    for tool in pg_dump pg_restore; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install postgresql-client)"
    done
    if [[ -z "$pg" ]]; then
        pg="$("$repo/scripts/pg-local.sh" url "$state")" || die "no --pg, no ASRF_PG, and scripts/pg-local.sh url failed"
    fi
    if [[ "$pg" =~ (^|[[:space:]?\&])password[[:space:]]*= || "$pg" =~ ^postgres(ql)?://[^/@]*:[^/@]*@ ]]; then
        die "the conninfo holds a password (it would show in ps): put it in PGPASSFILE or PGPASSWORD instead"
    fi
fi

# The PID of the process holding the RocksDB lock of a journal directory (a POSIX lock on
# journal/LOCK, listed in /proc/locks), or nothing when no process holds it.
journal_lock_holder() {
    local lock="$1/LOCK" ino
    [[ -e "$lock" && -r /proc/locks ]] || return 0
    ino="$(stat -c %i "$lock")"
    # Lines look like "1: POSIX  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"; matched on the inode
    # alone, so that a file system reporting another device number cannot hide a running broker.
    awk -v ino="$ino" '{ for (i = 2; i <= NF - 4; i++) if ($i == "POSIX") {
        n = split($(i + 4), id, ":"); if (n == 3 && id[3] == ino) { print $(i + 3); exit } } }' /proc/locks
}

broker_dir=""
if ((do_journal)); then
    if [[ -d "$state/broker/journal" ]]; then
        broker_dir="$state/broker"
    elif [[ -d "$state/journal" ]]; then
        broker_dir="$state"
    else
        die "no broker journal in $state/broker/journal or $state/journal (give --state-dir, or --no-journal)"
    fi
fi

mkdir -p "$out"
exec 9>"$out/.backup.lock"
flock -n 9 || die "another backup into $out is running"

# One time stamp names the whole backup; never reuse one.
while :; do
    ts="$(date -u +%Y%m%dT%H%M%SZ)"
    if [[ ! -e "$out/asrf-$ts.manifest" && ! -e "$out/asrf-$ts.dump" && ! -e "$out/journal-$ts" ]]; then break; fi
    sleep 1
done
dump="$out/asrf-$ts.dump"
journal_copy="$out/journal-$ts"
manifest="$out/asrf-$ts.manifest"
staging=""
partials=("$out/.asrf-$ts.dump.partial" "$out/.journal-$ts.partial" "$out/.asrf-$ts.manifest.partial")
finished=0

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT
    if ((!finished)); then
        rm -rf "${partials[@]}"
        if [[ -n "$staging" ]]; then rm -rf "$staging"; fi
        # A failure after the renames: take back what this run put under final names.
        if [[ ! -e "$manifest" ]]; then rm -rf "$dump" "$journal_copy"; fi
        ((rc != 0)) || rc=1
        echo "backup: failed; nothing was kept from this run" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "backup $ts into $out"
journal_how=""
if ((do_journal)); then
    holder="$(journal_lock_holder "$broker_dir/journal")"
    if [[ -n "$holder" ]]; then
        if [[ -z "$http" ]]; then
            if [[ -s "$broker_dir/http.endpoint" ]]; then
                http="$(head -n 1 "$broker_dir/http.endpoint")"
            else
                http="${ASRF_HTTP:-127.0.0.1:9100}"
            fi
        fi
        [[ -n "$http" ]] || die "the broker (PID $holder) holds the journal but has no HTTP address (--http ''): give --http, or stop it for a cold copy"
        command -v curl >/dev/null 2>&1 || die "curl not found (apt-get install curl)"
        staging="$broker_dir/backup-checkpoint-$ts"
        say "the broker (PID $holder) holds the journal: asking it for a checkpoint (POST http://$http/admin/journal-checkpoint)"
        answer="$(curl -sS --max-time 120 -w '\n%{http_code}' -X POST --data-urlencode "dir=$staging" \
            "http://$http/admin/journal-checkpoint" 2>&1)" ||
            die "cannot reach the broker's HTTP at $http ($answer); give --http HOST:PORT"
        code="${answer##*$'\n'}"
        body="${answer%$'\n'*}"
        if [[ "$code" == 403 ]]; then
            die "the broker at $http refused the checkpoint: it answers only loopback clients (is --http bound to a non-loopback address? use 0.0.0.0 or 127.0.0.1)"
        fi
        [[ "$code" == 200 && "$body" == ok* ]] || die "journal checkpoint failed (HTTP $code): $body"
        # The broker names itself: another broker's journal must never be saved as this one's.
        if [[ "$body" == "ok pid="* ]]; then
            answered="${body#ok pid=}"
            answered="${answered%%[^0-9]*}"
            if [[ "$answered" != "$holder" ]]; then
                rm -rf "$staging"
                die "the broker at $http is PID $answered, not PID $holder, which holds $broker_dir/journal: give --http HOST:PORT of that broker"
            fi
        fi
        [[ -f "$staging/CURRENT" ]] || die "the checkpoint in $staging is missing CURRENT (is $http the broker of $broker_dir?)"
        mv "$staging" "$out/.journal-$ts.partial"
        staging=""
        journal_how="checkpoint of the running broker (PID $holder) via http://$http/admin/journal-checkpoint"
    else
        say "no broker holds $broker_dir/journal (not running): copying it with cp -a"
        cp -a "$broker_dir/journal" "$out/.journal-$ts.partial"
        rm -f "$out/.journal-$ts.partial/LOCK"
        journal_how="cp -a of the stopped broker's journal $broker_dir/journal"
    fi
fi

if ((do_pg)); then
    say "dumping the database: pg_dump -Fc '$pg'"
    pg_dump --no-password -Fc -d "$pg" -f "$out/.asrf-$ts.dump.partial" ||
        die "pg_dump failed (is PostgreSQL up? the password in PGPASSFILE or PGPASSWORD?)"
    pg_restore -l "$out/.asrf-$ts.dump.partial" >/dev/null || die "the dump does not read back (pg_restore -l)"
fi

if ((do_journal)); then mv "$out/.journal-$ts.partial" "$journal_copy"; fi
if ((do_pg)); then mv "$out/.asrf-$ts.dump.partial" "$dump"; fi

{
    echo "# ASR Fleet backup $ts, made on $(hostname) by scripts/backup.sh"
    if ((do_pg)); then echo "# database: $pg (pg_dump $(pg_dump --version | awk '{print $3}'))"; fi
    if ((do_journal)); then echo "# journal: $journal_how"; fi
    echo "# check: cd $out && sha256sum -c asrf-$ts.manifest"
    echo "# restore: scripts/restore.sh $dump [--pg URL]${journal_how:+ --journal $journal_copy --state-dir STATE_DIR}"
    (
        cd "$out"
        if ((do_pg)); then sha256sum "asrf-$ts.dump"; fi
        if ((do_journal)); then find "journal-$ts" -type f -print0 | sort -z | xargs -0 -r sha256sum; fi
    )
} >"$out/.asrf-$ts.manifest.partial"
mv "$out/.asrf-$ts.manifest.partial" "$manifest"
finished=1

say "done: $manifest"
if ((do_pg)); then say "  database: $dump ($(du -sh "$dump" | cut -f1))"; fi
if ((do_journal)); then say "  journal:  $journal_copy ($(du -sh "$journal_copy" | cut -f1))"; fi

# Retention: the newest $keep complete backups stay. Entries of failed runs older than the newest
# complete backup go too.
mapfile -t stamps < <(find "$out" -maxdepth 1 -name 'asrf-*.manifest' -printf '%f\n' |
    sed -n 's/^asrf-\([0-9]\{8\}T[0-9]\{6\}Z\)\.manifest$/\1/p' | sort)
if ((keep > 0 && ${#stamps[@]} > keep)); then
    for old in "${stamps[@]:0:${#stamps[@]}-keep}"; do
        say "retention (--keep $keep): deleting backup $old"
        rm -rf "$out/asrf-$old.dump" "$out/journal-$old"
        rm -f "$out/asrf-$old.manifest"
    done
fi
newest="${stamps[${#stamps[@]}-1]}"
while IFS= read -r entry; do
    t="$(sed -n 's/^\.\{0,1\}\(asrf\|journal\)-\([0-9]\{8\}T[0-9]\{6\}Z\).*/\2/p' <<<"$entry")"
    [[ -n "$t" && "$t" < "$newest" && ! -e "$out/asrf-$t.manifest" ]] || continue
    say "removing $entry, left by an incomplete backup"
    rm -rf "${out:?}/$entry"
done < <(find "$out" -mindepth 1 -maxdepth 1 \( -name 'asrf-*' -o -name 'journal-*' -o -name '.asrf-*' -o -name '.journal-*' \) -printf '%f\n')
exit 0
