#!/usr/bin/env bash
# Install the Debian packages the test suite needs (listed in debian-packages.txt
# beside this script), without letting any of them start a system daemon.
#
# - Every package already installed (dpkg-query): does nothing, touches no apt state.
# - Not root and something missing: says what is missing and how to install it,
#   then exits 0 (the tests that need a missing tool skip locally, fail under CI=true).
# - Root and something missing: makes /usr/sbin/policy-rc.d refuse service starts
#   (exit 101) for the duration, preseeds debconf for postfix, runs `apt-get update`
#   only when needed, installs with --no-install-recommends, then stops any daemon
#   that the install started anyway.
#
# Environment:
#   DEBIAN_PACKAGES_FILE  package list to use (default: debian-packages.txt beside this script)
#   SKIP_DEBIAN_PACKAGES  set to 1 to skip this script entirely
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
list_file=${DEBIAN_PACKAGES_FILE:-$script_dir/debian-packages.txt}
me=install-debian-packages

log() { printf '%s: %s\n' "$me" "$*"; }
warn() { printf '%s: %s\n' "$me" "$*" >&2; }

if [[ ${SKIP_DEBIAN_PACKAGES:-0} == 1 ]]; then
    log "SKIP_DEBIAN_PACKAGES=1: skipping"
    exit 0
fi

if [[ ! -r $list_file ]]; then
    warn "package list $list_file not found"
    exit 1
fi

# Package names: strip comments and blank lines.
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]\+//g' "$list_file" | grep -v '^$' || true)
if (( ${#packages[@]} == 0 )); then
    log "no packages listed in $list_file"
    exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    warn "dpkg-query not found: not a Debian-like system, cannot check or install:"
    warn "  ${packages[*]}"
    warn "install the equivalents by hand; tests needing them will skip (or fail under CI=true)"
    exit 0
fi

is_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ $status == "install ok installed" ]]
}

missing_packages() {
    local p
    for p in "${packages[@]}"; do
        is_installed "$p" || printf '%s\n' "$p"
    done
}

mapfile -t missing < <(missing_packages)
if (( ${#missing[@]} == 0 )); then
    log "all ${#packages[@]} packages already installed (${packages[*]})"
    exit 0
fi

if (( EUID != 0 )); then
    warn "missing Debian packages: ${missing[*]}"
    warn "install them with:"
    warn "  sudo bash scripts/install-debian-packages.sh"
    warn "or by hand:"
    warn "  sudo apt-get install --no-install-recommends ${missing[*]}"
    warn "  (then stop any daemon they started, e.g. sudo systemctl disable --now postfix squid tinyproxy danted postgresql redis-server)"
    warn "continuing: tests that need them skip locally and fail under CI=true"
    exit 0
fi

log "missing: ${missing[*]}"

# ---------------------------------------------------------------------------
# policy-rc.d: no package may start its service while we install.
# ---------------------------------------------------------------------------
policy=/usr/sbin/policy-rc.d
policy_backup=$policy.secure-your-server.bak
policy_marker='# written by secure-your-server scripts/install-debian-packages.sh'
policy_action=none   # none | remove | restore

policy_is_ours() { [[ -f $policy ]] && grep -qF "$policy_marker" "$policy"; }

policy_denies() {
    # invoke-rc.d only consults an executable policy-rc.d; 101 means "action forbidden".
    [[ -x $policy ]] || return 1
    local rc=0
    "$policy" secure-your-server-check start >/dev/null 2>&1 </dev/null || rc=$?
    (( rc == 101 ))
}

write_policy() {
    printf '#!/bin/sh\n%s\n# Forbids service starts during package installs; removed or restored when it ends.\nexit 101\n' \
        "$policy_marker" >"$policy.tmp.$$"
    chmod 0755 "$policy.tmp.$$"
    mv -f "$policy.tmp.$$" "$policy"
}

restore_policy() {
    case $policy_action in
        restore)
            if [[ -e $policy_backup ]]; then
                mv -f "$policy_backup" "$policy"
                log "restored the previous $policy"
            fi
            ;;
        remove)
            if policy_is_ours; then
                rm -f "$policy"
                log "removed the temporary $policy"
            fi
            ;;
    esac
    policy_action=none
}

if policy_is_ours; then
    # Left over from an interrupted run of this script.
    if [[ -e $policy_backup ]]; then
        policy_action=restore
    else
        policy_action=remove
    fi
    log "$policy from an earlier interrupted run found; will clean it up at the end"
elif policy_denies; then
    log "$policy already forbids service starts (exit 101); keeping it"
else
    if [[ -e $policy ]]; then
        mv -f "$policy" "$policy_backup"
        policy_action=restore
        log "$policy does not exit 101: backed it up to $policy_backup"
    else
        policy_action=remove
    fi
    write_policy
    log "wrote a temporary $policy (exit 101)"
fi
trap restore_policy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---------------------------------------------------------------------------
# Non-interactive apt with postfix preseeded to "No configuration".
# ---------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
export DEBCONF_NONINTERACTIVE_SEEN=true
export NEEDRESTART_SUSPEND=1
debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF

apt_opts=(-y -q -o DPkg::Lock::Timeout=600
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

lists_dir=/var/lib/apt/lists
updated=0

need_update() {
    # No package lists at all?
    if ! compgen -G "$lists_dir/*_Packages*" >/dev/null; then
        log "apt lists absent"
        return 0
    fi
    # Nothing in the lists refreshed within a day?
    if [[ -z $(find "$lists_dir" -maxdepth 1 -newermt '1 day ago' -print -quit 2>/dev/null) ]]; then
        log "apt lists older than a day"
        return 0
    fi
    # A missing package the current lists do not know?
    local p candidate
    for p in "${missing[@]}"; do
        candidate=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $candidate || $candidate == "(none)" ]]; then
            log "no install candidate for $p in the current apt lists"
            return 0
        fi
    done
    return 1
}

apt_update() {
    log "running apt-get update"
    if ! apt-get -q -o DPkg::Lock::Timeout=600 update </dev/null; then
        warn "apt-get update failed; trying the install with the lists as they are"
    fi
    updated=1
}

# Daemons these packages ship, by process name (postfix's is "master"; PostgreSQL's server is "postgres").
daemons=(master squid tinyproxy danted microsocks haproxy nginx apache2 privoxy postgres redis-server)

running_pids() {
    # Only daemons of the system's init (parent pid 1): an instance a test started meanwhile (tests/servers/*.py)
    # is a child of its test process and is none of this script's business.
    local d
    for d in "${daemons[@]}"; do
        pgrep -x -P 1 "$d" 2>/dev/null || true
    done | sort -n
}

if need_update; then
    apt_update
fi

mapfile -t pids_before < <(running_pids)

log "installing: ${missing[*]}"
if ! apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" </dev/null; then
    if (( updated == 0 )); then
        warn "install failed; refreshing the apt lists and trying once more"
        apt_update
        apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" </dev/null || {
            warn "apt-get install failed for: ${missing[*]}"
            exit 1
        }
    else
        warn "apt-get install failed for: ${missing[*]}"
        exit 1
    fi
fi

# ---------------------------------------------------------------------------
# Nothing from these packages may be left running by the system's init.
# Only processes that appeared during this install are touched.
# ---------------------------------------------------------------------------
mapfile -t pids_after < <(running_pids)
mapfile -t new_pids < <(comm -13 <(printf '%s\n' "${pids_before[@]}" | sed '/^$/d') \
                                 <(printf '%s\n' "${pids_after[@]}" | sed '/^$/d'))
if (( ${#new_pids[@]} > 0 )); then
    warn "the install started daemons despite policy-rc.d; stopping them:"
    ps -o pid=,comm=,args= -p "$(IFS=,; echo "${new_pids[*]}")" >&2 || true
    kill -TERM "${new_pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        alive=()
        for pid in "${new_pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        (( ${#alive[@]} == 0 )) && break
        sleep 0.1
    done
    if (( ${#alive[@]} > 0 )); then
        kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
fi

mapfile -t still_missing < <(missing_packages)
if (( ${#still_missing[@]} > 0 )); then
    warn "still not installed after apt-get: ${still_missing[*]}"
    exit 1
fi
log "installed: ${missing[*]}"
