#!/bin/sh
# Install or upgrade Tillflow edge from this unpacked bundle, roll back if it is unhealthy.
#
#   sh install.sh [--pubkey FILE] [--health-timeout S]              # on a terminal, as root
#   sh install.sh --root DIR --supervise process [--pubkey FILE] ... # into a tree (tests)
#
# 1. Verify the bundle: the Ed25519 signature of SHA256SUMS under the release public key
#    (--pubkey, else the one installed in /etc/tillflow/release.pub; the bundle carries
#    none, so it cannot vouch for itself), every file's SHA-256, no unlisted file.
#    Verifier (--verifier auto): the tillflow-edge already installed (trusted: it is not
#    part of the bundle under test), else openssl >= 1.1.1 with sha256sum. With neither
#    (a first install on a terminal without openssl) the installer refuses, unless
#    --verifier bundle is given: the bundle's own binary then checks it, which catches
#    corruption but cannot catch a forgery; use it only for media you trust.
# 2. Create the service user (systemd mode), /opt/tillflow/releases/<version>/,
#    /etc/tillflow/ (config kept if present), /var/lib/tillflow/; install the unit (and the
#    update units and script, systemd/README.md, when the bundle carries them).
# 3. Switch /opt/tillflow/current to the new release atomically (rename of a symlink),
#    keeping the previous release; restart the service; wait for health: systemd mode,
#    `systemctl is-active` (Type=notify: active only after READY=1) and then the
#    daemon's GET /v1/health; process mode, the process alive and /v1/health answering.
# 4. Not healthy within --health-timeout: switch `current` back, restart, wait again.
#    Releases other than current and previous are pruned after a healthy upgrade.
#
# --supervise systemd (default without --root) | process (runs the daemon as a plain
# background process, pid in <root>/run/tillflow-edge.pid: tests) | none (install only).
#
# Exit: 0 installed and healthy; 1 error; 2 usage; 3 bundle refused (not verified);
# 4 unhealthy, rolled back to the previous release (healthy); 5 unhealthy and no
# healthy release to fall back to.
set -eu

BUNDLE=$(cd "$(dirname "$0")" && pwd -P)
ROOT=""
PUBKEY=""
SUPERVISE=""
VERIFIER=auto
HEALTH_TIMEOUT=60
SERVICE=tillflow-edge
SERVICE_USER=tillflow

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $1"; exit "${2:-1}"; }
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory" 2; ROOT=$2; shift 2 ;;
        --pubkey) [ $# -ge 2 ] || die "--pubkey needs a file" 2; PUBKEY=$2; shift 2 ;;
        --supervise) [ $# -ge 2 ] || die "--supervise needs a mode" 2; SUPERVISE=$2; shift 2 ;;
        --verifier) [ $# -ge 2 ] || die "--verifier needs a name" 2; VERIFIER=$2; shift 2 ;;
        --health-timeout) [ $# -ge 2 ] || die "--health-timeout needs seconds" 2
            HEALTH_TIMEOUT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" 2 ;;
    esac
done
case "$HEALTH_TIMEOUT" in '' | *[!0-9]*) die "--health-timeout must be whole seconds" 2 ;; esac
case "$VERIFIER" in auto | installed | openssl | bundle) ;; *) die "--verifier: $VERIFIER?" 2 ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT" && ROOT=$(cd "$ROOT" && pwd -P)
    SUPERVISE=${SUPERVISE:-none}
else
    SUPERVISE=${SUPERVISE:-systemd}
fi
case "$SUPERVISE" in systemd | process | none) ;; *) die "--supervise: $SUPERVISE?" 2 ;; esac
[ "$SUPERVISE" != systemd ] || [ -z "$ROOT" ] || die "--root installs cannot use systemd" 2

OPT=$ROOT/opt/tillflow
RELEASES=$OPT/releases
CURRENT=$OPT/current
ETC=$ROOT/etc/tillflow
CONFIG=$ETC/edge.yaml
STATE=$ROOT/var/lib/tillflow
UNIT_DIR=$ROOT/etc/systemd/system
PIDFILE=$ROOT/run/$SERVICE.pid
LOGFILE=$ROOT/var/log/$SERVICE.log

[ -f "$BUNDLE/VERSION" ] || die "$BUNDLE holds no VERSION: not an unpacked bundle"
VERSION=$(cat "$BUNDLE/VERSION")
case "$VERSION" in '' | .* | *[!A-Za-z0-9._+-]*) die "bad VERSION '$VERSION' in $BUNDLE" ;; esac

# --- 1. verify ----------------------------------------------------------------------

KEY=${PUBKEY:-$ETC/release.pub}
[ -f "$KEY" ] || die "no release public key: pass --pubkey FILE on a first install" 3

openssl_ok() {
    command -v openssl >/dev/null 2>&1 && command -v sha256sum >/dev/null 2>&1 &&
        openssl pkeyutl -help 2>&1 | grep -q -- -rawin
}

verify_openssl() {
    listed=$(mktemp) && present=$(mktemp) || return 1
    rc=0
    (
        cd "$BUNDLE" &&
            openssl pkeyutl -verify -pubin -inkey "$KEY" -rawin \
                -in SHA256SUMS -sigfile SHA256SUMS.sig >/dev/null &&
            sha256sum -c --quiet --strict SHA256SUMS &&
            [ -z "$(find . -type l)" ] &&
            cut -c67- SHA256SUMS | sort >"$listed" &&
            find . -type f ! -name SHA256SUMS ! -name SHA256SUMS.sig | sed 's|^\./||' |
            sort >"$present" &&
                cmp -s "$listed" "$present"
    ) || rc=1
    rm -f "$listed" "$present"
    return "$rc"
}

verify() {
    method=$VERIFIER
    if [ "$method" = auto ]; then
        if [ -x "$CURRENT/tillflow-edge" ]; then method=installed
        elif openssl_ok; then method=openssl
        else die "no trusted verifier: no tillflow-edge installed and no openssl with Ed25519; \
pass --verifier bundle only for media you trust" 3
        fi
    fi
    say "verifying $BUNDLE with the $method verifier and $KEY"
    case "$method" in
        installed) "$CURRENT/tillflow-edge" verify-bundle "$BUNDLE" --pubkey "$KEY" >&2 ;;
        openssl) openssl_ok || die "openssl cannot verify Ed25519 here" 3; verify_openssl ;;
        bundle) "$BUNDLE/tillflow-edge/tillflow-edge" verify-bundle "$BUNDLE" --pubkey "$KEY" >&2 ;;
    esac
}

verify || die "REFUSED: $BUNDLE does not verify (signature, checksum or unlisted file)" 3

# --- service control ------------------------------------------------------------------

nap() { sleep 0.2 2>/dev/null || sleep 1; }

stop_service() {
    case "$SUPERVISE" in
        systemd) systemctl stop "$SERVICE" || true ;;
        process)
            [ -f "$PIDFILE" ] || return 0
            pid=$(cat "$PIDFILE")
            if kill -TERM "$pid" 2>/dev/null; then
                n=0
                while kill -0 "$pid" 2>/dev/null; do
                    n=$((n + 1))
                    # TimeoutStopSec=30 of the unit, then SIGKILL as systemd would.
                    [ "$n" -lt 150 ] || { kill -KILL "$pid" 2>/dev/null || true; break; }
                    nap
                done
            fi
            rm -f "$PIDFILE"
            ;;
    esac
}

start_service() {
    case "$SUPERVISE" in
        systemd) systemctl restart --no-block "$SERVICE" ;;
        process)
            stop_service
            mkdir -p "$(dirname "$PIDFILE")" "$(dirname "$LOGFILE")"
            nohup "$CURRENT/tillflow-edge" run --config "$CONFIG" </dev/null >>"$LOGFILE" 2>&1 &
            echo $! >"$PIDFILE"
            ;;
    esac
}

healthy_now() {
    case "$SUPERVISE" in
        systemd) systemctl is-active --quiet "$SERVICE" || return 1 ;;
        process) kill -0 "$(cat "$PIDFILE")" 2>/dev/null || return 2 ;;
        none) return 0 ;;
    esac
    "$CURRENT/tillflow-edge" health --config "$CONFIG" >/dev/null 2>&1
}

wait_healthy() {
    deadline=$(($(date +%s) + HEALTH_TIMEOUT))
    while :; do
        rc=0
        healthy_now || rc=$?
        [ "$rc" -ne 0 ] || return 0
        if [ "$rc" -eq 2 ]; then say "the daemon exited"; return 1; fi
        [ "$(date +%s)" -lt "$deadline" ] || { say "not healthy after ${HEALTH_TIMEOUT}s"; return 1; }
        nap
    done
}

switch_to() {
    # A new symlink renamed over the old one: readers see the old or the new, never none.
    rm -f "$OPT/.current.new"
    ln -s "releases/$1" "$OPT/.current.new"
    mv -T "$OPT/.current.new" "$CURRENT"
}

# --- 2. install -----------------------------------------------------------------------

if [ "$SUPERVISE" = systemd ]; then
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/tillflow --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
fi
mkdir -p "$RELEASES" "$ETC" "$STATE" "$UNIT_DIR"
chmod 0755 "$OPT" "$RELEASES"
chmod 0700 "$STATE"

PREVIOUS=""
[ -L "$CURRENT" ] && PREVIOUS=$(basename "$(readlink "$CURRENT")")
if [ "$PREVIOUS" = "$VERSION" ]; then
    say "$VERSION is already the current release; nothing to do"
    exit 0
fi

rm -rf "${RELEASES:?}/.$VERSION.partial" "${RELEASES:?}/$VERSION"
cp -R "$BUNDLE/tillflow-edge" "$RELEASES/.$VERSION.partial"
cp "$BUNDLE/VERSION" "$RELEASES/.$VERSION.partial/VERSION"
# The root side of install_release under systemd runs the INSTALLED release's copy.
[ ! -f "$BUNDLE/tillflow-edge-update.sh" ] ||
    cp "$BUNDLE/tillflow-edge-update.sh" "$RELEASES/.$VERSION.partial/tillflow-edge-update.sh"
mv "$RELEASES/.$VERSION.partial" "$RELEASES/$VERSION"

[ -f "$CONFIG" ] || cp "$BUNDLE/edge.yaml" "$CONFIG"
[ -f "$ETC/release.pub" ] || cp "$KEY" "$ETC/release.pub"
cp "$BUNDLE/tillflow-edge.service" "$UNIT_DIR/.$SERVICE.service.new"
mv "$UNIT_DIR/.$SERVICE.service.new" "$UNIT_DIR/$SERVICE.service"
chmod 0644 "$UNIT_DIR/$SERVICE.service" "$ETC/release.pub"
UPDATE_UNITS=""  # the daemon's hand-off to root (systemd/README.md), when the bundle has them
for unit in "$SERVICE-update.path" "$SERVICE-update.service"; do
    [ -f "$BUNDLE/$unit" ] || continue
    cp "$BUNDLE/$unit" "$UNIT_DIR/.$unit.new" && mv "$UNIT_DIR/.$unit.new" "$UNIT_DIR/$unit"
    chmod 0644 "$UNIT_DIR/$unit"
    UPDATE_UNITS="$UPDATE_UNITS $unit"
done
chmod 0640 "$CONFIG"
if [ "$SUPERVISE" = systemd ]; then
    chgrp "$SERVICE_USER" "$CONFIG"
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"
    systemctl daemon-reload
    systemctl enable "$SERVICE" >/dev/null 2>&1
    case "$UPDATE_UNITS" in *.path*) systemctl enable --now "$SERVICE-update.path" >/dev/null 2>&1 ;; esac
fi

# --- 3. switch, restart, check --------------------------------------------------------

switch_to "$VERSION"
[ -z "$PREVIOUS" ] || echo "$PREVIOUS" >"$OPT/previous"
say "current -> releases/$VERSION (previous: ${PREVIOUS:-none}); starting"
start_service
if [ "$SUPERVISE" = none ] || wait_healthy; then
    for old in "$RELEASES"/*; do
        name=$(basename "$old")
        [ "$name" = "$VERSION" ] || [ "$name" = "$PREVIOUS" ] || rm -rf "$old"
    done
    say "installed $VERSION: healthy"
    exit 0
fi

# --- 4. roll back ---------------------------------------------------------------------

if [ -z "$PREVIOUS" ] || [ ! -x "$RELEASES/$PREVIOUS/tillflow-edge" ]; then
    stop_service
    die "$VERSION is not healthy and there is no previous release to roll back to" 5
fi
say "$VERSION is not healthy: rolling back to $PREVIOUS"
switch_to "$PREVIOUS"
rm -f "$OPT/previous"
start_service
wait_healthy || die "rolled back to $PREVIOUS, which is not healthy either" 5
say "rolled back to $PREVIOUS: healthy; $VERSION left in $RELEASES for inspection"
exit 4
