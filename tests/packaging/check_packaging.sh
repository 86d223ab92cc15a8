#!/bin/bash
# make check-packaging: builds the .deb packages (lintian-clean), installs
# them with dpkg, verifies the installed units, runs the installed daemon the
# way systemd would — socket activation through systemd-socket-activate, a
# NOTIFY_SOCKET and watchdog of our own, the unit's User=, directories and
# limits — and checks READY/RELOADING/STOPPING, answers through the activated
# socket from the installed dsctl and from a program built with
# `pkg-config --cflags --libs dsclient`; then purges and checks that nothing
# installed is left. Needs root and no running dsd package; no systemd PID 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${DS_BUILD:-build}
HERE=tests/packaging
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; if [ -n "${2:-}" ]; then sed 's/^/     | /' <<<"$2" | tail -40; fi; }
finish() {
	echo "$pass passed, $fail failed"
	[ "$fail" -eq 0 ]
	exit
}
check() { # check NAME COMMAND...: runs it, ok if it exits 0
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then ok "$name"; else bad "$name" "$out"; fi
}

if [ "$(id -u)" -ne 0 ]; then
	echo "check_packaging.sh: needs root (installs packages)"
	echo "0 passed, 1 failed"
	exit 1
fi
PKGS="dsd libdsclient0 libdsclient-dev"
T=$(mktemp -d /tmp/dsd-pkgtest.XXXXXX)
chmod 0755 "$T"
daemon_pid=
listener_pid=
cleanup() {
	[ -n "$daemon_pid" ] && kill -KILL "$daemon_pid" 2>/dev/null
	[ -n "$listener_pid" ] && kill "$listener_pid" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT
start=$(date +%s)

# --- build -----------------------------------------------------------------
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 && dpkg --purge "$p" >/dev/null 2>&1; done
if make --no-print-directory BUILD="$BUILD" deb >"$T/deb.log" 2>&1; then
	ok "make deb ($(($(date +%s) - start)) s)"
else
	bad "make deb" "$(cat "$T/deb.log")"
	finish
fi
debs=()
for p in $PKGS; do debs+=("$(ls "$BUILD"/deb/"$p"_*.deb 2>/dev/null | head -1)"); done
lint=$(grep -E '^[EW]: ' "$BUILD/deb/lintian.log" 2>/dev/null)
if [ -f "$BUILD/deb/lintian.log" ] && [ -z "$lint" ]; then
	ok "lintian: no errors or warnings"
else
	bad "lintian" "$lint"
fi

t0=$(date +%s)
if make --no-print-directory BUILD="$BUILD" rpm >"$T/rpm.log" 2>&1; then
	ok "make rpm ($(($(date +%s) - t0)) s); rpmlint: $(grep -oE '[0-9]+ errors, [0-9]+ warnings' "$BUILD/rpm/rpmlint.log")"
else
	bad "make rpm (rpmbuild + rpmlint without errors)" "$(tail -40 "$T/rpm.log")"
fi

# --- install ---------------------------------------------------------------
for p in "${debs[@]}"; do dpkg-deb -c "$p"; done | awk '$1 ~ /^d/ { sub(/^\./, "", $6); sub(/\/$/, "", $6); print $6 }' |
	sort -u | while read -r d; do [ -d "$d" ] && echo "$d"; done >"$T/dirs.before"
if out=$(dpkg -i "${debs[@]}" 2>&1); then ok "dpkg -i ${debs[*]##*/}"; else bad "dpkg -i" "$out"; finish; fi
for p in $PKGS; do dpkg -L "$p" >"$T/files.$p"; done
check "service user and group dsd created (sysusers.d)" \
	bash -c 'getent passwd dsd && getent group dsd'
check "/etc/dsd/dsd.conf is a conffile" \
	bash -c 'dpkg-query -W -f="\${Conffiles}\n" dsd | grep -q "^ /etc/dsd/dsd.conf "'
units=(/lib/systemd/system/dsd.socket /lib/systemd/system/dsd.service)
man=--man=no
command -v man >/dev/null && man=--man=yes
out=$(systemd-analyze verify $man "${units[@]}" 2>&1)
if [ $? -eq 0 ] && [ -z "$out" ]; then ok "systemd-analyze verify $man: units clean"; else bad "systemd-analyze verify" "$out"; fi
check "man pages installed: dsd(8) dsctl(1) dsd.conf(5) libdsclient(3)" bash -c \
	'for m in man8/dsd.8 man1/dsctl.1 man5/dsd.conf.5 man3/libdsclient.3; do
		zcat /usr/share/man/$m.gz | grep -q "^\.TH" || { echo "missing $m"; exit 1; }; done'
check "dsd links no library outside ld.so's paths" bash -c \
	'! ldd /usr/sbin/dsd /usr/bin/dsctl | grep -E "not found"'

# --- run the installed daemon as dsd.service would ---------------------------
svc=/lib/systemd/system/dsd.service
execstart=$(sed -n 's/^ExecStart=//p' "$svc")
user=$(sed -n 's/^User=//p' "$svc")
read -r -a cmd <<<"$execstart"
# What systemd sets up for the unit: its directories, owned by User=, the
# environment (Environment=, *_DIRECTORY), LimitMEMLOCK=, UMask=.
for d in /run/dsd /var/lib/dsd /var/cache/dsd; do install -d -o "$user" -g "$user" -m 0755 "$d"; done
envs=(-E STATE_DIRECTORY=/var/lib/dsd -E CACHE_DIRECTORY=/var/cache/dsd -E RUNTIME_DIRECTORY=/run/dsd)
while read -r e; do envs+=(-E "$e"); done < <(sed -n 's/^Environment=//p' "$svc")
sock=$T/dsd.sock
python3 "$HERE/notify_listener.py" "$T/notify" "$T/notify.log" &
listener_pid=$!
for _ in $(seq 50); do [ -S "$T/notify" ] && break; sleep 0.1; done
# systemd-socket-activate listens, waits for the first connection, then
# execs (same pid) setpriv, which execs the daemon: so $$ of the bash below
# is the daemon's pid, which sd_notify and sd_watchdog_enabled check.
memlock_capped=0
(ulimit -l unlimited) 2>/dev/null || memlock_capped=1
(
	ulimit -l unlimited 2>/dev/null
	umask "$(sed -n 's/^UMask=//p' "$svc")"
	exec bash -c 'exec systemd-socket-activate -l "$0" -E NOTIFY_SOCKET="$1" -E WATCHDOG_USEC=2000000 \
		-E WATCHDOG_PID=$$ "${@:2}"' "$sock" "$T/notify" "${envs[@]}" \
		setpriv --reuid="$user" --regid="$user" --init-groups "${cmd[@]}"
) >"$T/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
# As dsd.socket does: group dsd, mode 0660.
chgrp "$user" "$sock" && chmod 0660 "$sock"

wait_notify() { # wait_notify REGEX SECONDS [AFTER_LINE]: line number of the first match
	local deadline=$((SECONDS + $2)) n
	while [ $SECONDS -lt $deadline ]; do
		n=$(awk -v re="$1" -v after="${3:-0}" 'NR > after && $0 ~ re { print NR; exit }' "$T/notify.log" 2>/dev/null)
		[ -n "$n" ] && { echo "$n"; return 0; }
		kill -0 "$daemon_pid" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# The first client connection starts the daemon; dsctl waits in the backlog.
out=$(timeout 120 dsctl --socket "$sock" status 2>&1)
rc=$?
model=$(sed -n 's/^path *= *//p' /etc/dsd/dsd.conf)
if [ $rc -eq 0 ] && grep -qF "$model" <<<"$out"; then ok "installed dsctl answered through the activated socket"; else
	bad "dsctl through the activated socket (exit $rc)" "$out
--- daemon log:
$(cat "$T/daemon.log")"; fi
if ready=$(wait_notify '(^| |\|)READY=1' 60); then
	loading=$(awk -v r="$ready" 'NR < r && /STATUS=/ && tolower($0) ~ /load/' "$T/notify.log")
	if [ -n "$loading" ] && sed -n "${ready}p" "$T/notify.log" | grep -qF "STATUS=serving $model"; then
		ok "READY=1 after STATUS= while loading, with the model being served"
	else
		bad "READY=1 without a loading STATUS= before it or the model in its STATUS=" "$(cat "$T/notify.log")"
	fi
else
	bad "READY=1 not received" "$(cat "$T/notify.log" "$T/daemon.log")"
fi
if [ -n "$(awk '$2 != 0 && $2 != '"$daemon_pid"'' "$T/notify.log")" ]; then
	bad "notifications from the main pid only (NotifyAccess=main)" "$(cat "$T/notify.log")"
else
	ok "notifications come from the main pid (NotifyAccess=main)"
fi
check "program built with pkg-config dsclient links and runs" \
	bash -c "cc -std=c11 -Wall -Werror -o '$T/client' $HERE/client_smoke.c \$(pkg-config --cflags --libs dsclient) &&
		ldd '$T/client' | grep -qE 'libdsclient.so.0 => /(usr/)?lib/' && '$T/client' '$sock'"
out=$(dsctl doctor --socket "$sock" 2>&1)
rc=$?
fails=$(grep '^\[FAIL\]' <<<"$out")
if [ $rc -eq 0 ]; then
	ok "dsctl doctor: no problems on the installed package"
elif [ "$memlock_capped" = 1 ] && [ $rc -eq 1 ] && [ "$(wc -l <<<"$fails")" -eq 1 ] &&
	grep -q 'may lock only' <<<"$fails"; then
	# This machine does not let root raise RLIMIT_MEMLOCK, which systemd's
	# LimitMEMLOCK=infinity would: the doctor must report exactly that.
	ok "dsctl doctor: only the memlock cap of this machine ($(ulimit -Hl) KiB) reported"
else
	bad "dsctl doctor (exit $rc)" "$out"
fi
if wait_notify '(^| |\|)WATCHDOG=1' 5 >/dev/null; then ok "WATCHDOG=1 sent (WatchdogSec=)"; else
	bad "no WATCHDOG=1 within 5 s with WATCHDOG_USEC=2 s" "$(cat "$T/notify.log")"; fi

# SIGHUP: RELOADING=1 with MONOTONIC_USEC=, then READY=1 again.
before=$(wc -l <"$T/notify.log")
kill -HUP "$daemon_pid"
if r=$(wait_notify 'RELOADING=1' 30 "$before"); then
	if sed -n "${r}p" "$T/notify.log" | grep -q 'MONOTONIC_USEC=[0-9]'; then ok "SIGHUP: RELOADING=1 with MONOTONIC_USEC="; else
		bad "SIGHUP: RELOADING=1 without MONOTONIC_USEC=" "$(cat "$T/notify.log")"; fi
	if wait_notify '(^| |\|)READY=1' 30 "$((r - 1))" >/dev/null &&
		[ "$(wait_notify '(^| |\|)READY=1' 1 "$((r - 1))")" -ge "$r" ]; then
		ok "SIGHUP: READY=1 after RELOADING=1"
	else
		bad "SIGHUP: no READY=1 after RELOADING=1" "$(cat "$T/notify.log")"
	fi
else
	bad "SIGHUP: no RELOADING=1" "$(cat "$T/notify.log" "$T/daemon.log")"
fi
out=$(timeout 30 dsctl --socket "$sock" status 2>&1) && ok "dsctl answers after the reload" || bad "dsctl after reload" "$out"

# SIGTERM: STOPPING=1 and a clean exit.
before=$(wc -l <"$T/notify.log")
kill -TERM "$daemon_pid"
wait_notify 'STOPPING=1' 30 "$before" >/dev/null && ok "SIGTERM: STOPPING=1" || bad "SIGTERM: no STOPPING=1" "$(cat "$T/notify.log")"
for _ in $(seq 300); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$daemon_pid" 2>/dev/null; then
	bad "daemon still running 30 s after SIGTERM"
else
	wait "$daemon_pid"
	rc=$?
	[ $rc -eq 0 ] && ok "daemon exited 0 after SIGTERM" || bad "daemon exit status $rc after SIGTERM" "$(tail -20 "$T/daemon.log")"
fi
daemon_pid=

# --- purge -----------------------------------------------------------------
if out=$(dpkg --purge libdsclient-dev libdsclient0 dsd 2>&1); then ok "dpkg --purge"; else bad "dpkg --purge" "$out"; fi
# Files must be gone; directories too, unless they existed before the
# installation (shared ones such as /usr/sbin).
left=$(cat "$T"/files.* | sort -u | while read -r f; do
	[ "$f" = /. ] && continue
	if [ -d "$f" ]; then
		grep -qxF "$f" "$T/dirs.before" || echo "$f"
	elif [ -e "$f" ] || [ -L "$f" ]; then
		echo "$f"
	fi
done)
for d in /etc/dsd /var/lib/dsd /var/cache/dsd /run/dsd /usr/share/dsd; do [ -e "$d" ] && left+=$'\n'"$d"; done
left=$(sed '/^$/d' <<<"$left")
if [ -z "$left" ]; then ok "nothing installed is left after purge"; else bad "left after purge" "$left"; fi
check "packages gone from dpkg's database" bash -c '! dpkg -s dsd libdsclient0 libdsclient-dev 2>/dev/null | grep -q "^Status: install"'

echo "check_packaging: $(($(date +%s) - start)) s"
finish
