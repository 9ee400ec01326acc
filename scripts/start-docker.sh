#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine.
#
# Idempotent: if `docker info` already answers, nothing is done. Otherwise
# Debian's docker.io (+ iptables) is installed when dockerd is missing, dockerd
# is started in the background, and we wait (deadline DOCKER_START_TIMEOUT,
# default 30 s) until `docker info` answers. Needs root or passwordless sudo
# for installing/starting. Never reads stdin.
set -euo pipefail

log() { printf 'start-docker: %s\n' "$*"; }
die() { printf 'start-docker: ERROR: %s\n' "$*" >&2; exit 1; }

exec </dev/null

timeout_s="${DOCKER_START_TIMEOUT:-30}"
logdir="${DOCKERD_LOG_DIR:-${TMPDIR:-/tmp}}"
logfile="$logdir/dockerd.log"

docker_answers() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && docker_answers; then
    log "docker engine already answers ($(docker info --format '{{.ServerVersion}}' 2>/dev/null || echo '?')); nothing to do"
    exit 0
fi

# Privilege: run as root, or through passwordless sudo.
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
    log "not root; using passwordless sudo"
else
    die "docker engine not reachable, and not root and no passwordless sudo to install/start it"
fi

if ! command -v dockerd >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "dockerd not installed and apt-get not available (not Debian?)"
    aptlog="${TMPDIR:-/tmp}/start-docker-apt.log"
    apt() {
        if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get -o DPkg::Lock::Timeout=120 "$@" >>"$aptlog" 2>&1; then
            tail -n 20 "$aptlog" >&2
            die "apt-get $1 failed (full output: $aptlog)"
        fi
    }
    log "dockerd not installed; running apt-get update (output: $aptlog)"
    apt update
    log "installing docker.io and iptables"
    apt install -y --no-install-recommends docker.io iptables
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
    log "installed $(dockerd --version 2>/dev/null || echo dockerd)"
else
    log "dockerd found at $(command -v dockerd)"
fi

command -v docker >/dev/null 2>&1 || die "docker client not found on PATH"

start_dockerd() {
    mkdir -p "$logdir"
    log "starting dockerd in the background (log: $logfile)"
    printf -- '--- %s start-docker.sh starting dockerd\n' "$(date -u +%FT%TZ)" >>"$logfile"
    # setsid + nohup: keep dockerd alive after this script (and its session) ends.
    "${SUDO[@]}" setsid nohup dockerd >>"$logfile" 2>&1 </dev/null &
    # With sudo, $! is sudo's pid, which lives as long as dockerd does.
    pid=$!
}

pid=""
if pid="$(pgrep -xo dockerd 2>/dev/null)"; then
    log "dockerd already running (pid $pid) but not answering yet; waiting for it"
else
    start_dockerd
fi

# a dockerd killed earlier (say, with the session that started it) can leave state behind
# that makes the next start exit at once; the start after that succeeds
attempts=1
deadline=$((SECONDS + timeout_s))
until docker_answers; do
    if ! kill -0 "$pid" 2>/dev/null && ! pgrep -x dockerd >/dev/null 2>&1; then
        if [ "$attempts" -lt 3 ]; then
            attempts=$((attempts + 1))
            log "dockerd exited before answering; starting it again (attempt $attempts)"
            start_dockerd
            continue
        fi
        # shellcheck disable=SC2016  # sed script: print this run's part of the log
        sed -n '/^--- .* start-docker.sh starting dockerd$/h; /^--- .* start-docker.sh starting dockerd$/!H; ${x;p}' "$logfile" | tail -n 20 >&2 || true
        die "dockerd exited before answering; see $logfile"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 20 "$logfile" >&2 2>/dev/null || true
        die "dockerd did not answer 'docker info' within ${timeout_s}s; see $logfile"
    fi
    sleep 0.2
done

log "docker engine answers ($(docker info --format '{{.ServerVersion}}, storage {{.Driver}}' 2>/dev/null || echo '?'))"
