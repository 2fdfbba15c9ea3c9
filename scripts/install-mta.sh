#!/usr/bin/env bash
# Exim, Sendmail and OpenSMTPD as test fixtures and snippet validators, without installing any of them as the
# system's MTA (each conflicts with Postfix, which the tests also need): each package is downloaded and extracted
# (apt-get download + dpkg -x) under $MTA_ROOT/<name>, and the system users its daemon drops to are made, as the
# package's postinst would. Nothing is started; no file outside $MTA_ROOT is written but /etc/passwd and /etc/group.
#
#   bash scripts/install-mta.sh [exim] [sendmail] [opensmtpd]     (default: all three)
#
# Not root: says what is missing and exits 0 (the tests that need it skip locally and fail under CI=true).
set -euo pipefail
MTA_ROOT=${MTA_ROOT:-/opt/secure-your-server}
me=install-mta

declare -A PACKAGES=(
    [exim]="exim4-daemon-light exim4-base exim4-config"
    [sendmail]="sendmail-bin sendmail-base"
    [opensmtpd]="opensmtpd"
)
declare -A BINARY=(
    [exim]=usr/sbin/exim4
    [sendmail]=usr/libexec/sendmail/sendmail
    [opensmtpd]=usr/sbin/smtpd
)
# user:group pairs the daemons drop to (Debian's postinst scripts make the same)
declare -A USERS=(
    [exim]="Debian-exim:Debian-exim"
    [sendmail]="smmta:smmta smmsp:smmsp"
    [opensmtpd]="opensmtpd:opensmtpd opensmtpq:opensmtpq"
)

make_users() {
    local pair user group
    for pair in ${USERS[$1]}; do
        user=${pair%%:*} group=${pair##*:}
        getent group "$group" >/dev/null || groupadd --system "$group"
        getent passwd "$user" >/dev/null || useradd --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --gid "$group" "$user"
    done
}

users_present() {
    local pair
    for pair in ${USERS[$1]}; do
        getent passwd "${pair%%:*}" >/dev/null || return 1
    done
}

install_one() {
    local name=$1 root binary work missing
    root=${EXIM_ROOT:-}
    [[ $name == exim && -n $root ]] || root=$MTA_ROOT/$name
    binary=$root/${BINARY[$name]}
    if [[ -x $binary ]] && users_present "$name"; then
        echo "$me: $name already extracted at $root"
        return 0
    fi
    if (( EUID != 0 )); then
        echo "$me: not root, so $name is not extracted; as root run: bash scripts/install-mta.sh $name"
        return 0
    fi
    work=$(mktemp -d)
    chmod 0777 "$work"  # apt-get download drops to _apt
    # shellcheck disable=SC2086
    (cd "$work" && apt-get download ${PACKAGES[$name]} >/dev/null 2>&1) || {
        apt-get update >/dev/null && (cd "$work" && apt-get download ${PACKAGES[$name]} >/dev/null)
    }
    mkdir -p "$root"
    for deb in "$work"/*.deb; do dpkg -x "$deb" "$root"; done
    rm -rf "$work"
    make_users "$name"
    missing=$(ldd "$binary" | awk '/not found/ {print $1}')
    if [[ -n $missing ]]; then
        echo "$me: $name: missing libraries: $missing (install the packages that provide them)" >&2
        return 1
    fi
    echo "$me: extracted $name at $root"
}

names=("$@")
(( ${#names[@]} )) || names=(exim sendmail opensmtpd)
for name in "${names[@]}"; do
    [[ -n ${PACKAGES[$name]:-} ]] || { echo "$me: unknown MTA $name (exim, sendmail, opensmtpd)" >&2; exit 2; }
    install_one "$name"
done
