#!/usr/bin/env bash
# Exim for validating the guides' Exim snippets, without installing it as the MTA (it conflicts with Postfix):
# the Debian packages are downloaded and extracted under $EXIM_ROOT, and the user the binary was built for is made.
set -euo pipefail
EXIM_ROOT=${EXIM_ROOT:-/opt/secure-your-server/exim}
binary="$EXIM_ROOT/usr/sbin/exim4"
if [ -x "$binary" ] && getent passwd Debian-exim >/dev/null; then
    echo "exim: already extracted at $EXIM_ROOT"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "exim: not root, so not extracted; as root run: bash scripts/install-exim.sh (the Exim snippet tests need it)"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"  # apt-get download drops to _apt
(cd "$work" && apt-get download exim4-daemon-light exim4-base exim4-config >/dev/null 2>&1) || {
    apt-get update >/dev/null && (cd "$work" && apt-get download exim4-daemon-light exim4-base exim4-config >/dev/null)
}
mkdir -p "$EXIM_ROOT"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$EXIM_ROOT"; done
getent passwd Debian-exim >/dev/null || useradd --system --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin Debian-exim
missing=$(ldd "$binary" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
    echo "exim: missing libraries: $missing (install the packages that provide them)" >&2
    exit 1
fi
echo "exim: extracted $("$binary" -bV 2>/dev/null | head -1) at $EXIM_ROOT"
