#!/bin/sh
# The root side of install_release under systemd: take the daemon's request, verify the
# release it staged with the INSTALLED binary, and only then run that release's install.sh.
#
#   sh tillflow-edge-update.sh                                  # tillflow-edge-update.service
#   sh tillflow-edge-update.sh --root DIR --supervise process|none [--health-timeout S]
#
# The daemon runs as `tillflow` (no privileges) and cannot install; it stages the
# release in its state directory and writes <state>/update/request.json (atomically):
#   {"id": "<32 hex>", "release": "<R>", "stage": "releases/stage/tillflow-edge-<R>"}
# tillflow-edge-update.path starts this script (as root) when that file exists. The
# request is untrusted input (whoever holds the daemon's user can write it), so:
# 1. it is renamed into root's own directory (never read in place, never followed), and
#    must be one line, exactly that form (json.dumps(sort_keys=True)), <= 1 KiB: it names
#    a release and its stage directory under the state directory, and nothing else;
# 2. the stage is entered one plain directory at a time (no symlink at any step) and must
#    resolve to <state>/releases/stage/tillflow-edge-<R>; it is copied into root's
#    private directory (symlinks copied as links, not followed), so the daemon cannot
#    change it after it is checked;
# 3. the copy must hold only regular files and directories, verify under the pinned
#    release key (/etc/tillflow/release.pub) with the installed tillflow-edge (never the
#    bundle's own binary), and carry VERSION = R;
# 4. only then is the copy's install.sh run (it verifies again, switches, restarts the
#    daemon and rolls back by itself when the new release is not healthy).
#
# The result is for the daemon to read (it cannot write here, but may read):
# <root>/var/lib/tillflow-update/result/<id>.rc (the exit status below, written last,
# atomically) and <id>.log (every line of this script and of install.sh).
# Exit: install.sh's statuses (0 installed, 1 error, 3 bundle refused, 4 rolled back,
# 5 unhealthy with no fallback), or 6: the request was refused (malformed, or its stage
# is not a plain directory where it must be). No request: exit 0, nothing done.
set -eu
set -f

ROOT=""
SUPERVISE=""
HEALTH_TIMEOUT=60

say() { printf 'tillflow-edge-update: %s\n' "$*" >&2; }
die() { say "error: $1"; exit "${2:-1}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory" 2; ROOT=$2; shift 2 ;;
        --supervise) [ $# -ge 2 ] || die "--supervise needs a mode" 2; SUPERVISE=$2; shift 2 ;;
        --health-timeout) [ $# -ge 2 ] || die "--health-timeout needs seconds" 2
            HEALTH_TIMEOUT=$2; shift 2 ;;
        -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" 2 ;;
    esac
done
case "$HEALTH_TIMEOUT" in '' | *[!0-9]*) die "--health-timeout must be whole seconds" 2 ;; esac
if [ -n "$ROOT" ]; then
    ROOT=$(cd "$ROOT" && pwd -P)
    case "$SUPERVISE" in process | none) ;; *) die "--root needs --supervise process|none" 2 ;; esac
else
    [ -z "$SUPERVISE" ] || [ "$SUPERVISE" = systemd ] || die "--supervise: $SUPERVISE?" 2
    SUPERVISE=systemd
fi

STATE=$ROOT/var/lib/tillflow
OWN=$ROOT/var/lib/tillflow-update
WORK=$OWN/work
RESULTS=$OWN/result
CURRENT=$ROOT/opt/tillflow/current
KEY=$ROOT/etc/tillflow/release.pub
NAME='[A-Za-z0-9_+-][A-Za-z0-9._+-]\{0,63\}'

umask 022
mkdir -p "$OWN" "$RESULTS"
chmod 0755 "$OWN" "$RESULTS"
rm -rf "$WORK"
mkdir -m 0700 "$WORK"
trap 'cd /; rm -rf "$WORK"' EXIT

# enter BASE REL: cd into BASE/REL one plain directory at a time; the real path must
# then be BASE's real path + /REL (a symlink swapped in at any step is caught here).
enter() {
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    cd "$1" || return 1
    base=$(pwd -P)
    old_ifs=$IFS
    IFS=/
    for part in $2; do
        if [ -z "$part" ] || [ ! -d "$part" ] || [ -L "$part" ] || ! cd "./$part"; then
            IFS=$old_ifs
            return 1
        fi
    done
    IFS=$old_ifs
    [ "$(pwd -P)" = "$base/$2" ]
}

# --- 1. take the request ------------------------------------------------------------------

[ -d "$STATE/update" ] || { say "no request"; exit 0; }
if ! enter "$STATE" update; then
    # Removed (the link, never its target), or the .path unit would start this again.
    [ ! -L "$STATE/update" ] || rm -f "$STATE/update" || true
    die "$STATE/update is not a plain directory: request refused" 6
fi
if [ ! -e request.json ] && [ ! -L request.json ]; then say "no request"; exit 0; fi
mv -fT request.json "$WORK/request.json"
cd /
REQ=$WORK/request.json
[ -f "$REQ" ] && [ ! -L "$REQ" ] || die "the request is not a regular file: refused" 6
[ "$(wc -c <"$REQ")" -le 1024 ] || die "the request is over 1 KiB: refused" 6
[ "$(grep -c '' "$REQ")" -eq 1 ] || die "the request is not one line: refused" 6
FIELDS=$(sed -n "s/^{\"id\": \"\([0-9a-f]\{32\}\)\", \"release\": \"\($NAME\)\", \"stage\": \"releases\/stage\/tillflow-edge-\($NAME\)\"}\$/\1 \2 \3/p" "$REQ")
[ -n "$FIELDS" ] || die "the request is malformed: refused" 6
# shellcheck disable=SC2086 # split on purpose (set -f: no globbing); three plain words
set -- $FIELDS
ID=$1 RELEASE=$2
[ "$3" = "$RELEASE" ] || die "the request's stage is not its release's: refused" 6
STAGE=releases/stage/tillflow-edge-$RELEASE

# Previous results were read already: the daemon asks again only after it reported.
set +f
rm -f "$RESULTS"/*.rc "$RESULTS"/*.log "$RESULTS"/.*.tmp
set -f

# --- 2.-4. copy, verify, install ----------------------------------------------------------

install_staged() {
    say "request $ID: release $RELEASE from $STATE/$STAGE"
    if ! enter "$STATE" "$STAGE"; then
        say "REFUSED: $STATE/$STAGE is not a plain directory (a symlink, or missing)"
        return 6
    fi
    if ! cp -R . "$WORK/bundle"; then cd /; say "cannot copy the stage"; return 1; fi
    cd /
    odd=$(find "$WORK/bundle" ! -type f ! -type d | head -n 1)
    if [ -n "$odd" ]; then
        say "REFUSED: ${odd#"$WORK/bundle/"} is not a regular file (a bundle holds files only)"
        return 3
    fi
    if [ ! -x "$CURRENT/tillflow-edge" ] || [ ! -f "$KEY" ]; then
        say "REFUSED: no installed tillflow-edge or no pinned key $KEY to verify with"
        return 3
    fi
    if ! "$CURRENT/tillflow-edge" verify-bundle "$WORK/bundle" --pubkey "$KEY" >&2; then
        say "REFUSED: the staged release does not verify under $KEY"
        return 3
    fi
    version=$(cat "$WORK/bundle/VERSION" 2>/dev/null || true)
    if [ "$version" != "$RELEASE" ]; then
        say "REFUSED: the staged release is '$version', the request names $RELEASE"
        return 6
    fi
    say "verified: running its install.sh"
    set -- --verifier installed --pubkey "$KEY" --health-timeout "$HEALTH_TIMEOUT"
    [ -z "$ROOT" ] || set -- "$@" --root "$ROOT" --supervise "$SUPERVISE"
    sh "$WORK/bundle/install.sh" "$@"
}

set +e
install_staged >"$RESULTS/$ID.log" 2>&1
rc=$?
set -e
cat "$RESULTS/$ID.log" >&2
chmod 0644 "$RESULTS/$ID.log"
printf '%s\n' "$rc" >"$RESULTS/.$ID.rc.tmp"
chmod 0644 "$RESULTS/.$ID.rc.tmp"
mv -f "$RESULTS/.$ID.rc.tmp" "$RESULTS/$ID.rc"
exit "$rc"
