#!/usr/bin/env python3
"""A NOTIFY_SOCKET endpoint, as systemd provides one: binds a datagram UNIX
socket at PATH and appends each sd_notify message to LOG as one line,
"<CLOCK_MONOTONIC usec> <sender pid> <fields separated by |>", flushing
after each so a test can poll the file. Runs until killed (SIGTERM)."""
import os
import signal
import socket
import struct
import sys
import time

path, log = sys.argv[1], sys.argv[2]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o777)  # the daemon runs as another user
# Ask for the sender's credentials, as systemd does (NotifyAccess=main).
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with open(log, "a", buffering=1) as out:
    while True:
        data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = data.decode("utf-8", "replace").strip("\n").replace("\n", "|")
        out.write(f"{now} {pid} {fields}\n")
