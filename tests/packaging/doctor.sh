#!/bin/bash
# `dsctl doctor` against set-ups made broken on purpose, one fault at a time,
# and against a correct one: each fault must be reported with its fix and
# set the exit status; the correct set-up must pass. Uses the accounts every
# Debian system has (nobody/nogroup, daemon, root) in place of dsd. Needs
# root (ownership changes); prints a skip otherwise.
set -uo pipefail
BUILD=${DS_BUILD:-build}
DSCTL=${DSCTL:-$BUILD/bin/dsctl}
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     | /' <<<"$2"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "doctor.sh: not root, skipped"
	echo "0 passed, 0 failed"
	exit 0
fi
[ -x "$DSCTL" ] || { bad "dsctl built at $DSCTL"; echo "$pass passed, $fail failed"; exit 1; }
DSCTL=$(readlink -f "$DSCTL")

# Not under /tmp: the doctor flags models there (dsd.service has PrivateTmp=yes).
T=$(readlink -f "$BUILD")/doctor-test.$$
mkdir -p "$T"
chmod 0755 "$T"
listener=
cleanup() {
	[ -n "$listener" ] && kill "$listener" 2>/dev/null
	rm -rf "$T"
}
trap cleanup EXIT

# A good model directory and a listening socket owned by the service's group.
mkdir -p "$T/model"
echo '{}' >"$T/model/config.json"
: >"$T/model/model.safetensors"
chmod 0755 "$T/model"
chmod 0644 "$T/model"/*
python3 - "$T/ok.sock" <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(8)
time.sleep(120)
EOF
listener=$!
for _ in $(seq 50); do [ -S "$T/ok.sock" ] && break; sleep 0.1; done
chgrp nogroup "$T/ok.sock"
chmod 0660 "$T/ok.sock"

conf() { # conf FILE BACKEND MODEL SOCKET
	printf '# written by doctor.sh\n[model]\nbackend = %s\npath = %s\n[server]\nsocket = %s\n' "$2" "$3" "$4" >"$1"
	chmod 0644 "$1"
}

# Every FAIL and warn line must be followed by its fix.
fixes_follow() {
	awk '/^\[(FAIL|warn)\]/ { want = 1; next }
	     want && !/^       fix: / { bad = 1 } { want = 0 }
	     END { exit (bad || want) }' <<<"$1"
}

run() { # run EXPECTED_RC NAME [ARGS...]: sets $out
	local want=$1 name=$2
	shift 2
	out=$("$DSCTL" doctor "$@" 2>&1)
	local rc=$?
	if [ "$rc" -ne "$want" ]; then
		bad "$name: exit $rc, expected $want" "$out"
		return 1
	fi
	if ! fixes_follow "$out"; then
		bad "$name: a problem without a fix line" "$out"
		return 1
	fi
	ok "$name: exit $rc"
}

expect() { # expect NAME REGEX: $out must match
	if grep -Eq -- "$2" <<<"$out"; then ok "$1"; else bad "$1 (no /$2/)" "$out"; fi
}

# 1. Everything right.
conf "$T/good.conf" cpu "$T/model" "$T/ok.sock"
run 0 "correct set-up" --config "$T/good.conf" --user nobody &&
	expect "correct set-up: connected" "^\[ ok \] connected to $T/ok.sock" &&
	expect "correct set-up: model readable" "model $T/model: 2 files, all readable by nobody" &&
	expect "correct set-up: summary" "^0 problems"

# 2. The socket does not exist.
run 1 "missing socket" --config "$T/good.conf" --user nobody --socket "$T/none.sock" &&
	expect "missing socket: fix" "fix: sudo systemctl enable --now dsd.socket"

# 3. The socket belongs to another group than the service's.
chgrp daemon "$T/ok.sock"
run 1 "socket group" --config "$T/good.conf" --user nobody &&
	expect "socket group: reported" "belongs to group daemon, not to the service's group" &&
	expect "socket group: fix" "fix: set SocketGroup=dsd"
chgrp nogroup "$T/ok.sock"

# 4. The socket is open to everyone: a warning, not a failure.
chmod 0666 "$T/ok.sock"
run 0 "world-writable socket" --config "$T/good.conf" --user nobody &&
	expect "world-writable socket: warned" "^\[warn\] socket .* is usable by every user"
chmod 0660 "$T/ok.sock"

# 5. The caller is not in the socket's group (run as nobody, service = root).
chgrp root "$T/ok.sock"
out=$(setpriv --reuid=nobody --regid=nogroup --clear-groups "$DSCTL" doctor \
	--config "$T/good.conf" --user root 2>&1)
rc=$?
if [ $rc -eq 1 ] && fixes_follow "$out"; then ok "not in group: exit 1"; else bad "not in group: exit $rc" "$out"; fi
expect "not in group: reported" "you \(nobody\) are not in group root"
expect "not in group: fix" "fix: sudo usermod -aG root nobody"
chgrp nogroup "$T/ok.sock"

# 6. The model directory is not readable by the service user.
chmod 0700 "$T/model"
run 1 "unreadable model dir" --config "$T/good.conf" --user nobody &&
	expect "unreadable model dir: reported" "nobody cannot list the model directory $T/model" &&
	expect "unreadable model dir: fix" "fix: sudo chmod -R o\+rX $T/model"
chmod 0755 "$T/model"

# 7. One model file is not readable.
chmod 0600 "$T/model/model.safetensors"
run 1 "unreadable model file" --config "$T/good.conf" --user nobody &&
	expect "unreadable model file: reported" "nobody cannot read $T/model/model.safetensors \(mode 0600\)"
chmod 0644 "$T/model/model.safetensors"

# 8. A parent directory is not searchable.
chmod 0700 "$T"
run 1 "unsearchable parent" --config "$T/good.conf" --user nobody &&
	expect "unsearchable parent: reported" "nobody cannot enter $T, on the way to the model"
chmod 0755 "$T"

# 9. A model under /tmp is invisible to the service (PrivateTmp=yes).
conf "$T/tmp.conf" cpu /tmp/some-model "$T/ok.sock"
run 1 "model under /tmp" --config "$T/tmp.conf" --user nobody &&
	expect "model under /tmp: reported" "PrivateTmp=yes"

# 10. backend = cuda where no GPU answers (or the build has no CUDA backend).
conf "$T/cuda.conf" cuda "$T/model" "$T/ok.sock"
if [ -e /dev/nvidiactl ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
	echo "skip backend = cuda without a GPU: this machine has one"
else
	run 1 "cuda without GPU" --config "$T/cuda.conf" --user nobody &&
		expect "cuda without GPU: reported" "backend = cuda, but" &&
		expect "cuda without GPU: fix names backend = auto" "fix: .*backend = auto"
fi

# 11. The service user does not exist; a missing configuration file is a warning.
run 1 "unknown service user" --config "$T/good.conf" --user no-such-user-dsd &&
	expect "unknown service user: reported" "service user 'no-such-user-dsd' does not exist"
run 1 "missing config" --config "$T/none.conf" --user nobody &&
	expect "missing config: warned" "^\[warn\] $T/none.conf does not exist; assuming the defaults"

# 13. The daemon behind the socket (a stand-in named "dsd") may lock too
# little memory; then enough.
fake_dsd() { # fake_dsd SOCKET MEMLOCK_BYTES|unlimited: a listener whose comm is "dsd"
	python3 - "$1" "$2" <<'EOF' &
import ctypes, resource, socket, sys, time
ctypes.CDLL(None).prctl(15, b"dsd", 0, 0, 0)  # PR_SET_NAME
lim = resource.RLIM_INFINITY if sys.argv[2] == "unlimited" else int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (lim, lim))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(8)
time.sleep(60)
EOF
	fake=$!
	for _ in $(seq 50); do [ -S "$1" ] && break; sleep 0.1; done
	chgrp nogroup "$1"
	chmod 0660 "$1"
}
fake_dsd "$T/low.sock" 65536
run 1 "daemon with a low memlock limit" --config "$T/good.conf" --user nobody --socket "$T/low.sock" &&
	expect "low memlock: reported" "the running dsd \(pid $fake\) may lock only 64 KiB" &&
	expect "low memlock: fix" "fix: LimitMEMLOCK=infinity"
kill $fake
hard=$(ulimit -Hl)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then
	fake_dsd "$T/high.sock" "$([ "$hard" = unlimited ] && echo unlimited || echo $((hard * 1024)))"
	run 0 "daemon with a high memlock limit" --config "$T/good.conf" --user nobody --socket "$T/high.sock" &&
		expect "high memlock: ok" "the running dsd \(pid $fake\) may lock enough memory"
	kill $fake
else
	echo "skip daemon with a high memlock limit: this machine caps it at $hard KiB"
fi

# 12. Bad usage exits 2.
"$DSCTL" doctor --bogus >/dev/null 2>&1
rc=$?
if [ $rc -eq 2 ]; then ok "bad usage: exit 2"; else bad "bad usage: exit $rc"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
