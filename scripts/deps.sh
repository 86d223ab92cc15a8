#!/bin/sh
# Installs the Debian 12 packages dsd needs to build and test, only those missing.
# Called by `make check` and `make run`; safe to run repeatedly.
set -eu
PKGS="build-essential pkg-config libcmocka-dev libpcre2-dev libcjson-dev libmsgpack-dev
liburing-dev libsystemd-dev libinih-dev clang libclang-rt-14-dev"
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps.sh: installing:$missing" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
