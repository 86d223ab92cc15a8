#!/usr/bin/env bash
# bench_load_fio.sh — builds a static fio (Debian 12's source, 3.33) into
# .gpu/uring/fio for tools/bench_load.sh: the GPU machine has no fio and no
# network, and Debian's binary needs librbd/libgfapi/libpmem/... there.
# Run here (the build machine); then carry .gpu/uring with the bench.
set -euo pipefail
DEST=${1:-.gpu/uring}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/lists/partial" "$DEST"
echo "deb-src http://deb.debian.org/debian bookworm main" >"$W/src.list"
o=(-o Dir::Etc::SourceList="$W/src.list" -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists="$W/lists")
apt-get "${o[@]}" update >/dev/null
(cd "$W" && apt-get "${o[@]}" source --download-only fio >/dev/null && tar xzf fio_*.orig.tar.gz)
cd "$W"/fio-*/
./configure --build-static --disable-native --disable-numa --disable-rdma --disable-rados --disable-rbd \
	--disable-http --disable-gfapi --disable-libnfs --disable-pmem --disable-xnvme --disable-libzbc \
	--disable-tcmalloc --disable-dfs >/dev/null
make -j"$(nproc)" fio >/dev/null
cd - >/dev/null
cp "$W"/fio-*/fio "$DEST/fio"
"$DEST/fio" --version
