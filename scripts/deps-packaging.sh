#!/bin/sh
# Installs the Debian 12 packages `make check-packaging`, `make deb` and
# `make rpm` need, only those missing (kept apart from deps.sh so that plain
# `make check` stays lean):
#   debhelper  dh, compat 13 (dh_installsystemd, dh_installsysusers)
#   lintian    checks the .deb packages
#   rpm        rpmbuild (and debugedit) for `make rpm`
#   rpmlint    checks the .rpm packages
#   systemd    systemd-analyze (verify) and systemd-socket-activate;
#              systemd-sysusers, which creates the dsd user on installation
#   man-db     `man`, which systemd-analyze verify uses to check Documentation=
set -eu
PKGS="build-essential debhelper lintian rpm rpmlint systemd man-db pkg-config"
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps-packaging.sh: installing:$missing" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
