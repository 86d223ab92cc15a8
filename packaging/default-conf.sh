#!/bin/sh
# default-conf.sh EXAMPLE MODELDIR — prints the configuration file that
# `make install` installs as /etc/dsd/dsd.conf: conf/dsd.conf.example with
# the [model] section's path set to the installed default model and
# backend = auto (CUDA when a GPU answers, the CPU otherwise), since one
# package serves machines with and without a GPU.
set -eu
if [ ! -f "$1" ]; then
	# No documented example in the tree: the two settings the package needs.
	printf '# /etc/dsd/dsd.conf -- see dsd.conf(5) for every setting and its default.\n\n'
	printf '[model]\npath = %s\nbackend = auto\n' "$2"
	exit 0
fi
awk -v model="$2" '
function flush() {
	if (sec == "model") {
		if (!done_path) print "path = " model
		if (!done_backend) print "backend = auto"
		done_path = done_backend = 1
	}
}
/^[[:space:]]*\[/ {
	flush()
	sec = $0; gsub(/[][[:space:]]/, "", sec)
	seen_model = seen_model || sec == "model"
	print; next
}
sec == "model" && /^[#;]?[[:space:]]*path[[:space:]]*=/ && !done_path {
	print "path = " model; done_path = 1; next
}
sec == "model" && /^[#;]?[[:space:]]*backend[[:space:]]*=/ && !done_backend {
	print "backend = auto"; done_backend = 1; next
}
{ print }
END {
	flush()
	if (!seen_model) { print ""; print "[model]"; print "path = " model; print "backend = auto" }
}' "$1"
