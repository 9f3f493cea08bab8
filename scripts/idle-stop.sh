#!/usr/bin/env bash
# Stops the fleet after it has been idle for a while: run every minute by
# asr-fleet-idle-stop.timer (deploy/systemd), or by hand.
#
#   scripts/idle-stop.sh            check once; stop the fleet when idle long enough
#   scripts/idle-stop.sh --status   print what it sees and would do; change nothing
#
# Each run reads the broker's /metrics. While asrf_jobs{state="queued"} and
# asrf_jobs{state="leased"} are both 0 the fleet is idle: the first idle run writes the time to the
# state file, and a run that finds it idle for ASRF_IDLE_MINUTES or longer runs the stop command
# and removes the state file. Any queued or leased job removes the state file (the count starts
# again). A broker that cannot be reached (stopped, or starting) also resets the count: the script
# never stops anything on missing data.
#
# Environment (the systemd unit reads /etc/asr-fleet/env):
#   ASRF_IDLE_MINUTES       idle minutes before stopping (default 30; 0 stops at the first idle run)
#   ASRF_IDLE_HTTP          the broker's HTTP HOST:PORT (default: $ASRF_HTTP, else 127.0.0.1:9100)
#   ASRF_IDLE_STATE_FILE    where the idle-since time is kept
#                           (default: $STATE_DIRECTORY/idle-since, else /var/lib/asr-fleet-idle/idle-since)
#   ASRF_IDLE_STOP_COMMAND  what stopping runs, through sh -c
#                           (default: systemctl stop --no-block asr-fleet.target)
#
# Exit status: 0 on every normal outcome (busy, idle, stopped, broker unreachable), 1 when the stop
# command failed, 2 on a usage error.
set -euo pipefail

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

status_only=0
for arg in "$@"; do
    case "$arg" in
        --status) status_only=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "idle-stop: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

minutes="${ASRF_IDLE_MINUTES:-30}"
[[ "$minutes" =~ ^[0-9]+$ ]] || { echo "idle-stop: ASRF_IDLE_MINUTES must be a whole number of minutes, not '$minutes'" >&2; exit 2; }
http="${ASRF_IDLE_HTTP:-${ASRF_HTTP:-127.0.0.1:9100}}"
state_file="${ASRF_IDLE_STATE_FILE:-${STATE_DIRECTORY:-/var/lib/asr-fleet-idle}/idle-since}"
stop_command="${ASRF_IDLE_STOP_COMMAND:-systemctl stop --no-block asr-fleet.target}"

say() { echo "idle-stop: $*"; }

reset() {
    if ((status_only == 0)); then rm -f "$state_file"; fi
}

# The value of one sample in the Prometheus text page, or nothing when absent.
sample() {
    awk -v want="$1" '$1 == want { print $2; exit }' <<<"$metrics"
}

# Without curl every check would read as "broker not reachable" and the fleet would never stop.
command -v curl >/dev/null 2>&1 || { echo "idle-stop: curl not found (apt-get install curl)" >&2; exit 1; }
if ! metrics="$(curl -fsS --max-time 5 "http://$http/metrics" 2>&1)"; then
    say "broker not reachable at http://$http/metrics (${metrics:-no answer}); not idle"
    reset
    exit 0
fi
queued="$(sample 'asrf_jobs{state="queued"}')"
leased="$(sample 'asrf_jobs{state="leased"}')"
if [[ -z "$queued" || -z "$leased" ]]; then
    say "no asrf_jobs{state=\"queued\"} / {state=\"leased\"} in http://$http/metrics; not idle"
    reset
    exit 0
fi

now="$(date +%s)"
if [[ "$queued" != 0 || "$leased" != 0 ]]; then
    say "busy: $queued queued, $leased leased"
    reset
    exit 0
fi

since=""
if [[ -f "$state_file" ]]; then
    since="$(head -n 1 "$state_file" 2>/dev/null || true)"
    [[ "$since" =~ ^[0-9]+$ ]] || since=""
fi
if [[ -z "$since" ]]; then
    since="$now"
    if ((status_only == 0)); then
        mkdir -p "$(dirname "$state_file")"
        printf '%s\n' "$since" >"$state_file.tmp"
        mv -f "$state_file.tmp" "$state_file"
    fi
fi
idle_s=$((now - since))
limit_s=$((minutes * 60))

if ((idle_s < limit_s)); then
    say "idle for ${idle_s} s (nothing queued or leased); stopping at ${limit_s} s"
    exit 0
fi
if ((status_only)); then
    say "idle for ${idle_s} s, limit ${limit_s} s: would run: $stop_command"
    exit 0
fi
say "idle for ${idle_s} s (limit ${limit_s} s): running: $stop_command"
rm -f "$state_file"
if ! sh -c "$stop_command"; then
    say "the stop command failed: $stop_command" >&2
    exit 1
fi
exit 0
