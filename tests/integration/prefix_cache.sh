#!/bin/bash
# The prefix cache through a real dsd (v3 fixture, 16-token blocks): a
# repeated prompt and a chat's second turn come back identical to the offline
# `dsd generate --no-mtp`, served partly from cache (stats --json: kv and
# prefix_cache keys), and `dsctl cache flush` empties the cache.
set -uo pipefail
BUILD=${DS_BUILD:-build}
DSD=$BUILD/bin/dsd
DSCTL=$BUILD/bin/dsctl
MODEL=tests/fixtures/v3
. tests/integration/lib.sh

offline() { "$DSD" generate --model "$MODEL" --ids "$1" --max-tokens "$2" --no-mtp --temperature 0 --threads 1 2>/dev/null; }
run() { "$DSCTL" --socket "$SOCK" run --prompt-ids "$1" --max-tokens "$2" --ids --temperature 0; }

"$DSD" serve --config "$T/empty.conf" --model "$MODEL" --socket "$SOCK" --threads 1 --block-tokens 16 2>>"$T/dsd.log" &
DPID=$!
for _ in $(seq 100); do
	[ -S "$SOCK" ] && "$DSCTL" --socket "$SOCK" status >/dev/null 2>&1 && break
	sleep 0.05
done

P1=$(seq -s, 10 79)            # 70 tokens: 4 full blocks
want=$(offline "$P1" 12)
check "$(run "$P1" 12)" "$want" "first request equals offline generation"
check "$(run "$P1" 12)" "$want" "the same prompt again (from cache) equals offline generation"
st=$(stats_until '"blocks_used":0,')
hit=$(num hit_tokens "$st")
[ "${hit:-0}" -ge 64 ] && ok "stats: the repeat was served from cache (hit_tokens $hit)" || bad "hit_tokens" "$st"
cached=$(num blocks_cached "$st")
[ "${cached:-0}" -ge 4 ] && ok "stats: kv.blocks_cached $cached after both finished, blocks_used 0" || bad "blocks_cached" "$st"

# a chat's second turn: first prompt + its reply + new tokens
P2="$P1,$(tr ' ' ',' <<<"$want"),200,201,202,203,204"
want2=$(offline "$P2" 10)
check "$(run "$P2" 10)" "$want2" "second turn equals offline generation"
st=$(stats_until "\"hit_tokens\":$((hit + 64))")
hit2=$(num hit_tokens "$st")
[ "${hit2:-0}" -ge $((hit + 64)) ] && ok "second turn reused the first turn's blocks (+$((hit2 - hit)) tokens)" || bad "second turn hits" "$st"

out=$("$DSCTL" --socket "$SOCK" cache flush)
check "$?" 0 "dsctl cache flush"
st=$(stats_until '"blocks_cached":0,')
[ $? -eq 0 ] && ok "after flush: no cached blocks" || bad "flush" "$st"
check "$(run "$P1" 12)" "$want" "after flush: recomputed, same tokens"
"$DSCTL" --socket "$SOCK" cache frob >/dev/null 2>&1
check "$?" 2 "dsctl cache with a bad verb: usage error"

kill -TERM "$DPID"
wait "$DPID"
check "$?" 0 "dsd exits 0"
DPID=

# A pool of 12 blocks of 16 tokens (v3: 20 KiB each) for 6 concurrent
# requests that need 9 blocks each (any two overlapping exceed the pool):
# sequences are preempted and recomputed,
# and every stream still equals the offline generation.
rm -f "$SOCK"
"$DSD" serve --config "$T/empty.conf" --model "$MODEL" --socket "$SOCK" --threads 1 --block-tokens 16 \
	--kv-bytes 245760 2>>"$T/dsd.log" &
DPID=$!
for _ in $(seq 100); do
	[ -S "$SOCK" ] && "$DSCTL" --socket "$SOCK" status >/dev/null 2>&1 && break
	sleep 0.05
done
for i in 1 2 3 4 5 6; do
	offline "$(seq -s, $((i * 50)) $((i * 50 + 39)))" 100 >"$T/want$i"
done
for i in 1 2 3 4 5 6; do
	run "$(seq -s, $((i * 50)) $((i * 50 + 39)))" 100 >"$T/got$i" 2>&1 &
done
wait $(jobs -p | grep -v "^$DPID$")
same=0
for i in 1 2 3 4 5 6; do cmp -s "$T/want$i" "$T/got$i" && [ -s "$T/want$i" ] && same=$((same + 1)); done
check "$same" 6 "tiny pool: 6 concurrent streams equal offline generation"
st=$(stats_until '"live":0')
pre=$(num preempted "$st")
[ "${pre:-0}" -ge 1 ] && ok "tiny pool: $pre preemptions happened" || bad "tiny pool preemptions" "$st"
kill -TERM "$DPID"
wait "$DPID"
check "$?" 0 "dsd exits 0 (tiny pool)"
DPID=
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
