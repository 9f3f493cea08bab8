#!/usr/bin/env bash
# Restores an ASR Fleet backup made by scripts/backup.sh: the database, and optionally the
# broker's journal.
#
#   scripts/restore.sh DUMP [--pg URL] [--force] [--journal DIR --state-dir DIR] [--no-verify]
#   scripts/restore.sh --journal DIR --state-dir DIR [--force]        (the journal only)
#
# DUMP (asrf-T.dump) goes into the database of --pg with pg_restore, in one transaction: all of it
# or nothing. The database is created, empty, when it does not exist. One that already holds
# tables is left alone unless --force, which drops the dump's objects first (pg_restore --clean);
# stop the broker and workers first, or their connections hold locks the restore waits for.
# Objects are restored owned by the connecting user (--no-owner --no-privileges), so a dump from a
# private cluster (user postgres) restores into a database of another user (e.g. asrf in compose).
#
# --journal DIR (journal-T from the same backup) puts that journal copy in place as the broker's
# journal: STATE_DIR/broker/journal (or STATE_DIR/journal when STATE_DIR is the broker's own state
# dir). The broker must be stopped; a journal already there is refused unless --force, which moves
# it aside to journal.before-restore-<time> (never deleted). Start the broker afterwards: it
# replays the journal, and sends PostgreSQL whatever job history it had not yet sent.
#
# When the backup's manifest (asrf-T.manifest) lies beside the dump or the journal copy, the
# files are checked against its sha256 sums first (--no-verify skips that).
#
# Options (defaults from the environment):
#   --pg URL          the target database: $ASRF_PG, else `scripts/pg-local.sh url STATE_DIR`.
#                     Never a password in it: use PGPASSFILE or PGPASSWORD
#   --state-dir DIR   the fleet's state root ($ASRF_STATE_DIR, else asrf-state/ in the repository;
#                     systemd: /var/lib/asr-fleet); needed with --journal
#   --journal DIR     a journal copy to put in place for a stopped broker
#   --force           replace a non-empty database or an existing journal (see above)
#   --no-verify       skip the manifest check
#
# Exit status: 0 restored, 1 failed or refused, 2 usage error.
set -euo pipefail

usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { echo "restore: $*"; }
die() { echo "restore: error: $*" >&2; exit 1; }
usage_error() { echo "restore: $*" >&2; echo "run scripts/restore.sh --help for the options" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dump=""
pg="${ASRF_PG:-}"
pg_given=0
state=""
journal=""
force=0
verify=1

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }
while (($#)); do
    case "$1" in
        --pg) need_value "$@"; pg="$2"; pg_given=1; shift 2 ;;
        --state-dir) need_value "$@"; state="$2"; shift 2 ;;
        --journal) need_value "$@"; journal="$2"; shift 2 ;;
        --pg=*|--state-dir=*|--journal=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --force) force=1; shift ;;
        --no-verify) verify=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage_error "unknown option: $1" ;;
        *)
            [[ -z "$dump" ]] || usage_error "one DUMP only (got '$dump' and '$1')"
            dump="$1"; shift ;;
    esac
done
[[ -n "$dump" || -n "$journal" ]] || usage_error "give a DUMP to restore (and/or --journal DIR --state-dir DIR)"
[[ -z "$journal" || -n "$state" ]] || usage_error "--journal needs --state-dir DIR (where the broker keeps its state)"
if [[ -z "$dump" && "$pg_given" == 1 ]]; then usage_error "--pg without a DUMP: nothing to restore into it"; fi
[[ -n "$state" ]] || state="${ASRF_STATE_DIR:-$repo/asrf-state}"
[[ "$state" == /* ]] || state="$PWD/$state"

# Checks the files of one backup entry (the dump, or journal-T/...) against the manifest beside it.
verify_against_manifest() {
    local dir="$1" entry="$2" stamp="$3" what="$4"
    local manifest="$dir/asrf-$stamp.manifest"
    if ((verify == 0)); then return 0; fi
    if [[ -z "$stamp" || ! -f "$manifest" ]]; then
        say "no manifest beside $what (asrf-${stamp:-T}.manifest): not checked"
        return 0
    fi
    local lines
    lines="$(awk -v e="$entry" '!/^#/ { p = substr($0, 67); if (p == e || index(p, e "/") == 1) print }' "$manifest")"
    [[ -n "$lines" ]] || die "$manifest lists nothing for $entry"
    (cd "$dir" && sha256sum -c --quiet --strict <<<"$lines") ||
        die "$what does not match $manifest (damaged or changed copy; --no-verify to restore it anyway)"
    if [[ -d "$dir/$entry" ]]; then
        local listed present
        listed="$(wc -l <<<"$lines")"
        present="$(find "$dir/$entry" -type f | wc -l)"
        [[ "$listed" == "$present" ]] || die "$what has $present files, its manifest lists $listed"
    fi
    say "$what matches $manifest"
}

# Same as in backup.sh: the PID holding the RocksDB lock of a journal directory, if any.
journal_lock_holder() {
    local lock="$1/LOCK" ino
    [[ -e "$lock" && -r /proc/locks ]] || return 0
    ino="$(stat -c %i "$lock")"
    awk -v ino="$ino" '{ for (i = 2; i <= NF - 4; i++) if ($i == "POSIX") {
        n = split($(i + 4), id, ":"); if (n == 3 && id[3] == ino) { print $(i + 3); exit } } }' /proc/locks
}

# ---- checks before anything changes ----
if [[ -n "$dump" ]]; then
    [[ -f "$dump" ]] || die "no such dump file: $dump"
    for tool in pg_restore psql; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install postgresql-client)"
    done
    pg_restore -l "$dump" >/dev/null 2>&1 || die "$dump is not a pg_dump custom-format archive (pg_dump -Fc)"
    dump_dir="$(cd "$(dirname "$dump")" && pwd)"
    dump_name="$(basename "$dump")"
    verify_against_manifest "$dump_dir" "$dump_name" \
        "$(sed -n 's/^asrf-\([0-9]\{8\}T[0-9]\{6\}Z\)\.dump$/\1/p' <<<"$dump_name")" "$dump"
    if [[ -z "$pg" ]]; then
        pg="$("$repo/scripts/pg-local.sh" url "$state")" || die "no --pg, no ASRF_PG, and scripts/pg-local.sh url failed"
    fi
    if [[ "$pg" =~ (^|[[:space:]?\&])password[[:space:]]*= || "$pg" =~ ^postgres(ql)?://[^/@]*:[^/@]*@ ]]; then
        die "the conninfo holds a password (it would show in ps): put it in PGPASSFILE or PGPASSWORD instead"
    fi
fi

broker_dir=""
if [[ -n "$journal" ]]; then
    [[ -d "$journal" && -f "$journal/CURRENT" ]] || die "$journal is not a journal copy (no CURRENT file in it)"
    journal="$(cd "$journal" && pwd)"
    journal_name="$(basename "$journal")"
    verify_against_manifest "$(dirname "$journal")" "$journal_name" \
        "$(sed -n 's/^journal-\([0-9]\{8\}T[0-9]\{6\}Z\)$/\1/p' <<<"$journal_name")" "$journal"
    if [[ -d "$state/journal" ]]; then broker_dir="$state"; else broker_dir="$state/broker"; fi
    if [[ -e "$broker_dir/journal" ]]; then
        holder="$(journal_lock_holder "$broker_dir/journal")"
        [[ -z "$holder" ]] || die "a broker (PID $holder) is running on $broker_dir/journal: stop it first"
        if [[ -n "$(ls -A "$broker_dir/journal" 2>/dev/null)" && "$force" != 1 ]]; then
            die "$broker_dir/journal already holds a journal: --force moves it aside and puts the copy in place"
        fi
    fi
fi

# ---- the database ----
# Splits a libpq conninfo (URI or key=value) into the database name (db_name) and the same
# conninfo naming the "postgres" maintenance database instead (maint).
db_name=""
maint=""
split_conninfo() {
    local c="$1"
    if [[ "$c" =~ ^postgres(ql)?:// ]]; then
        local scheme="${c%%://*}://" rest="${c#*://}" query="" path="" q
        local kept=()
        if [[ "$rest" == *\?* ]]; then query="${rest#*\?}"; rest="${rest%%\?*}"; fi
        if [[ "$rest" == */* ]]; then path="${rest#*/}"; rest="${rest%%/*}"; fi
        local parts=()
        IFS='&' read -ra parts <<<"$query"
        for q in "${parts[@]}"; do
            [[ -n "$q" ]] || continue
            if [[ "$q" == dbname=* ]]; then path="${q#dbname=}"; else kept+=("$q"); fi
        done
        db_name="$(printf '%b' "${path//%/\\x}")"
        maint="${scheme}${rest}/postgres"
        if ((${#kept[@]})); then maint+="?$(IFS='&'; echo "${kept[*]}")"; fi
    else
        local words=() w kept=()
        read -ra words <<<"$c"
        for w in "${words[@]}"; do
            if [[ "$w" == dbname=* ]]; then db_name="${w#dbname=}"; db_name="${db_name//\'/}"; else kept+=("$w"); fi
        done
        maint="${kept[*]} dbname=postgres"
    fi
    [[ -n "$db_name" ]] || db_name="${PGDATABASE:-}"
}

restore_database() {
    local err
    if err="$(psql -X --no-password -d "$pg" -Atqc 'SELECT 1' 2>&1 >/dev/null)"; then
        :
    elif [[ "$err" == *"does not exist"* ]]; then
        split_conninfo "$pg"
        [[ -n "$db_name" ]] || die "cannot tell the database name from '$pg': name it in --pg"
        say "creating the database \"$db_name\" (connecting to the maintenance database: $maint)"
        psql -X --no-password -d "$maint" -v ON_ERROR_STOP=1 -v db="$db_name" -q <<<'CREATE DATABASE :"db";' ||
            die "could not create the database \"$db_name\""
    else
        die "cannot connect to $pg: $err"
    fi

    local objects
    objects="$(psql -X --no-password -d "$pg" -Atq -v ON_ERROR_STOP=1 -c "
        SELECT string_agg(n.nspname || '.' || c.relname, ' ' ORDER BY n.nspname, c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'")" ||
        die "cannot list the tables of $pg"
    local clean=()
    if [[ -n "$objects" ]]; then
        if ((force == 0)); then
            local summary
            summary="$(psql -X --no-password -d "$pg" -Atq -c "SELECT 'jobs: ' || count(*) FROM jobs" 2>/dev/null || true)"
            summary+="$(psql -X --no-password -d "$pg" -Atq -c "SELECT ', results: ' || count(*) FROM results" 2>/dev/null || true)"
            die "the database is not empty (${summary:+$summary; }tables: $(cut -c1-300 <<<"$objects")); refusing to overwrite it. --force drops the dump's objects and restores them"
        fi
        say "--force: the database is not empty; dropping the dump's objects before restoring them"
        clean=(--clean --if-exists)
    fi

    say "restoring $dump into $pg (pg_restore, one transaction)"
    local t0=$SECONDS
    pg_restore --no-password --no-owner --no-privileges --single-transaction --exit-on-error \
        "${clean[@]}" -d "$pg" "$dump" || die "pg_restore failed: the database is as it was before"
    psql -X --no-password -d "$pg" -q -c 'ANALYZE' || say "warning: ANALYZE failed (the restore itself is done)"
    local counts
    counts="$(psql -X --no-password -d "$pg" -Atq -F ' ' -c "
        SELECT 'jobs ' || (SELECT count(*) FROM jobs) || ', results ' || (SELECT count(*) FROM results)
            || ', workers ' || (SELECT count(*) FROM workers)
            || ', schema version ' || coalesce((SELECT max(version)::text FROM schema_migrations), '?')" 2>/dev/null ||
        echo "(not an ASR Fleet schema)")"
    say "database restored in $((SECONDS - t0)) s: $counts"
}

if [[ -n "$dump" ]]; then restore_database; fi

# ---- the journal ----
if [[ -n "$journal" ]]; then
    mkdir -p "$broker_dir"
    # Checked again right before the swap: a broker may have started meanwhile.
    if [[ -e "$broker_dir/journal" ]]; then
        holder="$(journal_lock_holder "$broker_dir/journal")"
        [[ -z "$holder" ]] || die "a broker (PID $holder) is running on $broker_dir/journal: stop it first"
    fi
    rm -rf "$broker_dir/.journal.restoring"
    cp -a "$journal" "$broker_dir/.journal.restoring"
    rm -f "$broker_dir/.journal.restoring/LOCK"
    if [[ "$(id -u)" == 0 && "$(stat -c %u "$broker_dir")" != 0 ]]; then
        # The broker's state dir belongs to its service user (systemd: asr-fleet): so must this.
        chown -R --reference="$broker_dir" "$broker_dir/.journal.restoring"
    fi
    if [[ -e "$broker_dir/journal" ]]; then
        if [[ -n "$(ls -A "$broker_dir/journal" 2>/dev/null)" ]]; then
            aside="$broker_dir/journal.before-restore-$(date -u +%Y%m%dT%H%M%SZ)"
            mv "$broker_dir/journal" "$aside"
            say "--force: moved the broker's journal aside to $aside"
        else
            rmdir "$broker_dir/journal"
        fi
    fi
    mv "$broker_dir/.journal.restoring" "$broker_dir/journal"
    # The journal was copied before the database was dumped: jobs submitted in between are in the
    # database and not in the journal. The broker's next start numbers new jobs after the highest id
    # PostgreSQL holds, so that none takes one of theirs.
    touch "$broker_dir/continue-ids-after-postgres"
    say "journal restored: $broker_dir/journal (from $journal); start the broker with --state-dir $broker_dir"
fi
exit 0
