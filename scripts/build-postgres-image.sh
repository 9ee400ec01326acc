#!/usr/bin/env bash
# Provide a PostgreSQL 15 container image for the tests.
#
# Usage: scripts/build-postgres-image.sh [IMAGE]
#   IMAGE defaults to $REGISTRY_TEST_POSTGRES_IMAGE or local/postgres:15.
#
# Idempotent: if IMAGE exists locally nothing is done; else we try
# `docker pull IMAGE` (PULL_TIMEOUT, default 20 s); else IMAGE is built from
# Debian packages: debootstrap (minbase, bookworm) using this machine's apt
# mirror, postgresql-15 installed in a chroot, trimmed, and `docker import`ed
# with scripts/docker/entrypoint.sh (behaves like the official image's
# entrypoint for POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB).
# The build needs root (or passwordless sudo) and a running Docker engine
# (scripts/start-docker.sh). Never reads stdin.
set -euo pipefail

log() { printf 'build-postgres-image: %s\n' "$*"; }
die() { printf 'build-postgres-image: ERROR: %s\n' "$*" >&2; exit 1; }

exec </dev/null

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
entrypoint_src="$here/docker/entrypoint.sh"
image="${1:-${REGISTRY_TEST_POSTGRES_IMAGE:-local/postgres:15}}"
pull_timeout="${PULL_TIMEOUT:-20}"
suite="bookworm"
pg_major="15"

command -v docker >/dev/null 2>&1 || die "docker client not found (run scripts/start-docker.sh)"
docker info >/dev/null 2>&1 || die "docker engine not answering (run scripts/start-docker.sh)"

if docker image inspect "$image" >/dev/null 2>&1; then
    log "image $image already present; nothing to do"
    exit 0
fi

log "image $image not present; trying 'docker pull' (timeout ${pull_timeout}s)"
if timeout "$pull_timeout" docker pull -q "$image" >/dev/null 2>&1; then
    log "pulled $image"
    exit 0
fi
log "pull failed or timed out; building $image from Debian packages"

[ -r "$entrypoint_src" ] || die "missing $entrypoint_src"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
    log "not root; using passwordless sudo"
else
    die "building the image needs root (debootstrap/chroot), and there is no passwordless sudo"
fi
apt_env=(env DEBIAN_FRONTEND=noninteractive)

# Debian mirror: $DEBIAN_MIRROR, else the first URI of this machine's apt
# sources serving the plain suite (not -security), else deb.debian.org.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822: blank-line separated stanzas; want Types: deb and Suites: <suite>.
        awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ ("[ \t]" suite "[ \t]") && uri != "") {
                    print uri; found = 1; exit
                }
                types = ""; suites = ""; uri = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"  { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "suites:" { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            tolower($1) == "uris:"   { uri = $2 }
            END { if (!found) flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        # one-line format: deb [opts] URI SUITE COMPONENTS...
        sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }'
    done
}
mirror="${DEBIAN_MIRROR:-$(find_mirror | head -n 1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
log "using Debian mirror $mirror"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap (apt-get update + install)"
    "${SUDO[@]}" "${apt_env[@]}" apt-get -o DPkg::Lock::Timeout=120 update -qq || die "apt-get update failed"
    "${SUDO[@]}" "${apt_env[@]}" apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends debootstrap >/dev/null \
        || die "apt-get install debootstrap failed"
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/pg-rootfs.XXXXXX")"
buildlog="$rootfs.log"
chmod 755 "$rootfs"   # becomes the image's "/": must not stay mktemp's 0700
cleanup() {
    # never leave a mounted /proc behind before deleting the tree
    if mountpoint -q "$rootfs/proc" 2>/dev/null; then "${SUDO[@]}" umount -l "$rootfs/proc" || true; fi
    "${SUDO[@]}" rm -rf --one-file-system "$rootfs"
    rm -f "$buildlog"
    if [ -n "${tmp_tag:-}" ]; then docker rmi "$tmp_tag" >/dev/null 2>&1 || true; fi
}
# run a noisy step with its output in $buildlog; on failure show its tail and die
quiet() {
    local what="$1"; shift
    if ! "$@" >>"$buildlog" 2>&1; then
        tail -n 25 "$buildlog" >&2
        die "$what failed"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$SECONDS
log "debootstrap --variant=minbase $suite into $rootfs"
quiet "debootstrap from $mirror" "${SUDO[@]}" debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"
log "debootstrap done ($((SECONDS - t0))s)"

in_root() { "${SUDO[@]}" chroot "$rootfs" "$@"; }

# Same suites as the host for updates/security, when the host is Debian $suite.
sources="deb $mirror $suite main
deb $mirror $suite-updates main"
sec="$(awk '/^URIs:/ && $2 ~ /debian-security/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
[ -n "$sec" ] && sources="$sources
deb $sec $suite-security main"
printf '%s\n' "$sources" | "${SUDO[@]}" tee "$rootfs/etc/apt/sources.list" >/dev/null

# No service starts in the chroot; no default cluster; no docs/locales/man pages.
printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$rootfs/usr/sbin/policy-rc.d" >/dev/null
"${SUDO[@]}" chmod 755 "$rootfs/usr/sbin/policy-rc.d"
"${SUDO[@]}" mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
"${SUDO[@]}" tee "$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc" >/dev/null <<'CFG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
CFG
"${SUDO[@]}" mount -t proc proc "$rootfs/proc"

t1=$SECONDS
log "chroot: apt-get update"
quiet "apt-get update in the chroot" in_root "${apt_env[@]}" apt-get update
log "chroot: installing postgresql-common (no default cluster)"
quiet "installing postgresql-common in the chroot" \
    in_root "${apt_env[@]}" apt-get install -y --no-install-recommends postgresql-common
"${SUDO[@]}" sed -i -E 's/^#?[[:space:]]*create_main_cluster.*/create_main_cluster = false/' \
    "$rootfs/etc/postgresql-common/createcluster.conf"
log "chroot: installing postgresql-$pg_major"
quiet "installing postgresql-$pg_major in the chroot" \
    in_root "${apt_env[@]}" apt-get install -y --no-install-recommends "postgresql-$pg_major"
# shellcheck disable=SC2016  # ${Version} is a dpkg-query format, not shell
log "packages installed ($((SECONDS - t1))s): $(in_root dpkg-query -W -f='${Version}' "postgresql-$pg_major")"

log "trimming caches, docs, locales, LLVM JIT"
in_root apt-get clean
"${SUDO[@]}" umount "$rootfs/proc"
# shellcheck disable=SC2016  # expanded by the inner sh
"${SUDO[@]}" sh -c '
    set -e
    r="$1"; v="$2"
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
           "$r"/var/log/* "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
           "$r"/usr/share/locale/* "$r"/usr/share/i18n "$r"/usr/share/postgresql/"$v"/man \
           "$r"/usr/lib/postgresql/"$v"/lib/bitcode "$r"/usr/lib/postgresql/"$v"/lib/llvmjit*.so \
           "$r"/usr/lib/x86_64-linux-gnu/libLLVM* "$r"/usr/lib/x86_64-linux-gnu/libz3.so* \
           "$r"/usr/lib/aarch64-linux-gnu/libLLVM* "$r"/usr/lib/aarch64-linux-gnu/libz3.so* \
           "$r"/etc/postgresql/"$v" "$r"/var/lib/postgresql/"$v" \
           "$r"/usr/sbin/policy-rc.d "$r"/tmp/* "$r"/var/tmp/*
' sh "$rootfs" "$pg_major"
missing="$(in_root ldd "/usr/lib/postgresql/$pg_major/bin/postgres" | grep 'not found' || true)"
[ -z "$missing" ] || die "postgres binary lost libraries after trimming: $missing"

log "installing entrypoint and data directory"
"${SUDO[@]}" install -m 755 "$entrypoint_src" "$rootfs/usr/local/bin/docker-entrypoint.sh"
in_root sh -c '
    set -e
    mkdir -p /var/lib/postgresql/data /var/run/postgresql
    chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
    chmod 700 /var/lib/postgresql/data
    chmod 3777 /var/run/postgresql
'

bin="/usr/lib/postgresql/$pg_major/bin"
tmp_tag="local/postgres-import-tmp:$$"
log "docker import -> $tmp_tag"
"${SUDO[@]}" tar -C "$rootfs" --numeric-owner -c . | docker import \
    -c "ENV PATH=$bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    -c "ENV PGDATA=/var/lib/postgresql/data" \
    -c "ENV LANG=C.UTF-8" \
    -c "EXPOSE 5432" \
    -c "USER postgres" \
    -c 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    -c 'CMD ["postgres"]' \
    -m "postgresql-$pg_major from Debian $suite, built by scripts/build-postgres-image.sh" \
    - "$tmp_tag" >/dev/null || die "docker import failed"

# `docker import` cannot set STOPSIGNAL. Like the official image, stop with
# SIGINT (fast shutdown); with the default SIGTERM (smart shutdown) a
# `docker stop`/`restart` waits for every client to disconnect, i.e. until
# docker kills it after its 10 s grace period.
log "docker build: STOPSIGNAL SIGINT -> $image"
if ! printf 'FROM %s\nSTOPSIGNAL SIGINT\n' "$tmp_tag" | docker build -q -t "$image" - >>"$buildlog" 2>&1; then
    tail -n 5 "$buildlog" >&2
    log "WARNING: docker build failed; tagging the imported image without STOPSIGNAL (docker stop/restart will be slow while clients are connected)"
    docker tag "$tmp_tag" "$image" || die "docker tag failed"
fi
docker rmi "$tmp_tag" >/dev/null 2>&1 || true

size="$(docker image inspect -f '{{.Size}}' "$image")"
log "built $image ($((size / 1000000)) MB) in $((SECONDS - t0))s"
