#!/bin/bash
# Speculative decoding in the daemon, on the default model (its MTP module is
# trained, so drafts are accepted for real):
# - greedy streams equal `dsd generate --no-mtp` alone, 8 at once with MTP on
#   and off mixed, at depth 1 and 2, with chained verify+draft steps, under
#   a pool small enough to preempt;
# - drafting stops above mtp_max_batch and with mtp_depth 0;
# - the prefix cache ends up holding the same blocks with and without MTP
#   (rejected drafts never reach it), and a cached prompt still drafts;
# - sampling with MTP draws from the same distribution as without it (a
#   two-sample chi-square test, significance 0.001).
set -uo pipefail
BUILD=${DS_BUILD:-build}
DSD=$BUILD/bin/dsd
DSCTL=$BUILD/bin/dsctl
MODEL=models/dsv3-tiny/bf16
BACKEND=${DS_BACKEND:-cpu}   # the GPU machine runs it with cuda
N=${DS_MTP_SAMPLES:-400}
. tests/integration/lib.sh

start() { # extra serve flags
	[ -n "$DPID" ] && { kill "$DPID"; wait "$DPID"; }
	rm -f "$SOCK"
	"$DSD" serve --config "$T/empty.conf" --model "$MODEL" --socket "$SOCK" --threads 1 --backend "$BACKEND" "$@" \
		2>>"$T/dsd.log" &
	DPID=$!
	for _ in $(seq 200); do
		[ -S "$SOCK" ] && "$DSCTL" --socket "$SOCK" status >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	return 1
}
stats() { "$DSCTL" --socket "$SOCK" stats --json; }
run() { "$DSCTL" --socket "$SOCK" run --ids --temperature 0 --max-tokens 40 "$@"; }

PROMPTS=("Once upon a time" "The king said" "In the morning the" "She looked at the" "It was a dark"
	"The history of" "He went to the" "There is no")
# over two 16-token blocks, for the prefix cache
LONG="The history of the old kingdom began in the days of the first king, who ruled the land for many years and built a city by the river."
for i in "${!PROMPTS[@]}"; do
	"$DSD" generate --model "$MODEL" --backend "$BACKEND" --prompt "${PROMPTS[$i]}" --max-tokens 40 --temperature 0 --no-mtp --threads 1 \
		--json 2>/dev/null | grep -o '^{"id":[0-9]*' | cut -d: -f2 | paste -sd' ' >"$T/want$i"
done
[ -s "$T/want0" ] && ok "offline references (dsd generate --no-mtp)" || bad "offline references" "$(cat "$T/want0")"

# A GPU's kernels add in another order when a step holds more rows (other
# GEMM algorithms, attention splits; the KV then differs in its last bf16
# bits), so a stream decoded in a batch may leave the one decoded alone
# where the reference's two best tokens are close. On such backends a
# stream passes when it equals the reference or first departs from it by
# taking the reference's second-best token where the top-2 log-prob margin
# (margin$i and second$i, from the daemon alone without MTP) is under 0.25
# (the largest seen on an H100 was 0.12, the others under 0.02; GPU logits
# differ from transformers' by up to 0.5: docs/PERFORMANCE.md). The CPU
# backend adds in the same order at every batch size: equal, always.
agree() { # prompt index
	cmp -s "$T/want$1" "$T/got$1" && return 0
	[ "$BACKEND" = cpu ] && return 1
	python3 - "$T/want$1" "$T/got$1" "$T/margin$1" "$T/second$1" "$1" >>"$T/ties" <<'EOF'
import sys
w, g = open(sys.argv[1]).read().split(), open(sys.argv[2]).read().split()
m = [float(x) for x in open(sys.argv[3]).read().split()]
sec = open(sys.argv[4]).read().split()
k = next((i for i in range(min(len(w), len(g))) if w[i] != g[i]), None)
ok = k is not None and k < len(m) and m[k] < 0.25 and g[k] == sec[k]
print(f"prompt {sys.argv[5]}: departs at token {k}"
      + (f", reference margin {m[k]:.4f}, took {'its' if g[k] == sec[k] else 'not its'} second-best" if ok or (k is not None and k < len(m)) else "")
      + f" ({'near tie' if ok else 'NOT a near tie'})")
sys.exit(0 if ok else 1)
EOF
}

concurrent() { # label, extra run flags for odd requests
	local same=0
	for i in "${!PROMPTS[@]}"; do
		if [ $((i % 2)) -eq 1 ] && [ -n "$1" ]; then run $1 "${PROMPTS[$i]}" >"$T/got$i" 2>&1 &
		else run "${PROMPTS[$i]}" >"$T/got$i" 2>&1 & fi
	done
	wait $(jobs -p | grep -v "^$DPID$")
	for i in "${!PROMPTS[@]}"; do agree "$i" && same=$((same + 1)); done
	echo "$same"
}

# --- depth 1, drafting at every batch size ---
start --mtp-max-batch 64 || bad "dsd serve started"
if [ "$BACKEND" != cpu ]; then
	margins=0
	for i in "${!PROMPTS[@]}"; do
		"$DSCTL" --socket "$SOCK" run --json --logprobs 2 --no-mtp --temperature 0 --max-tokens 40 "${PROMPTS[$i]}" |
			python3 -c '
import json, sys
ev = [json.loads(l) for l in sys.stdin if "\"token\"" in l]
print(" ".join(str(e["token"]) for e in ev), file=open(sys.argv[1], "w"))
print(" ".join(str(e["top"][0][1] - e["top"][1][1]) for e in ev), file=open(sys.argv[2], "w"))
print(" ".join(str(e["top"][1][0]) for e in ev), file=open(sys.argv[3], "w"))' \
				"$T/alone$i" "$T/margin$i" "$T/second$i"
		cmp -s "$T/alone$i" "$T/want$i" && margins=$((margins + 1))
	done
	check "$margins" 8 "reference margins: the daemon alone decodes as dsd generate (8/8)"
fi
same=0
for i in "${!PROMPTS[@]}"; do run "${PROMPTS[$i]}" >"$T/got$i" && cmp -s "$T/want$i" "$T/got$i" && same=$((same + 1)); done
check "$same" 8 "greedy, one at a time, MTP on: 8/8 equal dsd generate --no-mtp"
check "$(concurrent "")" 8 "greedy, 8 at once, MTP on: 8/8 equal"
check "$(concurrent --no-mtp)" 8 "greedy, 8 at once, MTP on and --no-mtp mixed: 8/8 equal"
st=$(stats_until '"live":0')
dr=$(num drafted "$st")
ac=$(num accepted "$st")
tps=$(num tokens_per_step "$st")
[ "${dr:-0}" -gt 0 ] && [ "${ac:-0}" -gt 0 ] && awk -v t="$tps" 'BEGIN { exit !(t > 1.1) }' &&
	ok "stats: $ac of $dr drafts accepted, $tps tokens per decode step" || bad "mtp stats" "$st"
json=$("$DSCTL" --socket "$SOCK" run --json --temperature 0 --max-tokens 20 "${PROMPTS[0]}" | tail -1)
d1=$(num drafted "$json")
[ "${d1:-0}" -gt 0 ] && ok "final event: drafted $d1, accepted $(num accepted "$json")" || bad "final event drafted" "$json"
json=$("$DSCTL" --socket "$SOCK" run --json --temperature 0 --max-tokens 20 --no-mtp "${PROMPTS[0]}" | tail -1)
check "$(num drafted "$json")" 0 "--no-mtp: nothing drafted for that request"

# --- verify and draft in one engine call (the CUDA default; on the CPU the
# engine runs the two steps) ---
start --mtp-max-batch 64 --mtp-chain 1 || bad "dsd serve --mtp-chain 1 started"
check "$(concurrent --no-mtp)" 8 "greedy, 8 at once, chained steps, with --no-mtp mixed: 8/8 equal"
st=$(stats_until '"live":0')
[ "$(num accepted "$st")" -gt 0 ] 2>/dev/null && ok "chained steps: $(num accepted "$st") of $(num drafted "$st") drafts accepted" ||
	bad "chained steps accept drafts" "$st"

# --- a prompt served from the prefix cache still drafts, and equals offline ---
start --mtp-max-batch 64 --block-tokens 16 || bad "dsd serve --block-tokens 16 started"
want=$("$DSD" generate --model "$MODEL" --backend "$BACKEND" --prompt "$LONG" --max-tokens 40 --temperature 0 --no-mtp --threads 1 \
	--json 2>/dev/null | grep -o '^{"id":[0-9]*' | cut -d: -f2 | paste -sd' ')
check "$(run "$LONG")" "$want" "long prompt, MTP on: equals offline"
json=$("$DSCTL" --socket "$SOCK" run --json --temperature 0 --max-tokens 40 "$LONG")
got=$(grep -o '"token":[0-9]*' <<<"$json" | cut -d: -f2 | paste -sd' ')
last=$(tail -1 <<<"$json")
c1=$(num cached_tokens "$last")
d1=$(num drafted "$last")
[ "${c1:-0}" -ge 16 ] && [ "${d1:-0}" -gt 0 ] && [ "$got" = "$want" ] &&
	ok "the same prompt again: $c1 tokens from cache, $d1 drafts, same tokens" || bad "cached + mtp" "$last"$'\n'"got:  $got"$'\n'"want: $want"

# --- depth 2 (chained drafts) ---
start --mtp-max-batch 64 --mtp-depth 2 || bad "dsd serve --mtp-depth 2 started"
check "$(concurrent --no-mtp)" 8 "greedy, 8 at once, depth 2: 8/8 equal"
st=$(stats_until '"live":0')
check "$(num depth "$st")" 2 "stats: mtp.depth 2"

# --- the batch threshold and depth 0 ---
start --mtp-max-batch 0 || bad "dsd serve --mtp-max-batch 0 started"
check "$(concurrent "")" 8 "mtp_max_batch 0: 8/8 equal"
st=$(stats_until '"live":0')
check "$(num drafted "$st")" 0 "mtp_max_batch 0: nothing drafted"
check "$(num depth "$st")" 0 "mtp_max_batch 0: MTP off (no MTP KV kept)"
start --mtp-max-batch 2 || bad "dsd serve --mtp-max-batch 2 started"
check "$(concurrent "")" 8 "mtp_max_batch 2, 8 at once: 8/8 equal"
st=$(stats_until '"live":0')
tps2=$(num tokens_per_step "$st")
awk -v t="$tps2" -v u="$tps" 'BEGIN { exit !(t >= 1 && t < u) }' &&
	ok "mtp_max_batch 2: fewer tokens per step ($tps2) than drafting always ($tps)" || bad "threshold" "$st"

# --- rollback: the prefix cache holds what a run without MTP leaves ---
prefix_state() { # serve flags (not in a subshell: start sets DPID)
	start --block-tokens 16 "$@" || return 1
	for i in 0 1 2 0 3; do run "${PROMPTS[$i]}" >/dev/null; done
	run "$LONG" >/dev/null
	run "$LONG" >/dev/null
	st=$(stats_until '"live":0')
	pstate="cached $(num blocks_cached "$st") used $(num blocks_used "$st") hits $(num hit_tokens "$st")"
}
prefix_state --mtp-max-batch 64
a=$pstate
prefix_state --mtp-depth 0
b=$pstate
check "$a" "$b" "prefix cache after the same requests with MTP and without: $a"
st=$(stats)
check "$(num depth "$st")" 0 "mtp_depth 0: stats say off"

# --- preemption under a tiny pool: 5 blocks of 16 tokens for 8 requests of 3
# each, so any two that overlap near their ends cannot both stay (with 12
# blocks five had to overlap, which a loaded 2-core machine did not always
# produce) ---
# (the GPU keeps the KV in bf16, the CPU in float32: 5 blocks either way)
KVB=160000
[ "$BACKEND" != cpu ] && KVB=80000
start --mtp-max-batch 64 --block-tokens 16 --kv-bytes $KVB || bad "dsd serve with a small pool started"
check "$(concurrent "")" 8 "tiny pool, 8 at once, MTP on: 8/8 equal"
st=$(stats_until '"live":0')
pre=$(num preempted "$st")
[ "${pre:-0}" -ge 1 ] && ok "tiny pool: $pre preemptions ($(num blocks_total "$st") blocks)" || bad "tiny pool preemptions" "$st"

# --- sampling: the same distribution with and without MTP ---
start --mtp-max-batch 64 || bad "dsd serve started (sampling)"
for s in $(seq 1 $N); do
	"$DSCTL" --socket "$SOCK" run --ids --temperature 1 --top-k 3 --max-tokens 2 --seed $s "${PROMPTS[0]}"
done >"$T/with"
for s in $(seq 100001 $((100000 + N))); do
	"$DSCTL" --socket "$SOCK" run --ids --temperature 1 --top-k 3 --max-tokens 2 --seed $s --no-mtp "${PROMPTS[0]}"
done >"$T/without"
st=$(stats_until '"live":0')
res=$(python3 - "$T/with" "$T/without" <<'EOF'
import collections, sys
a = collections.Counter(l.strip() for l in open(sys.argv[1]) if l.strip())
b = collections.Counter(l.strip() for l in open(sys.argv[2]) if l.strip())
na, nb = sum(a.values()), sum(b.values())
# cells: (first, second) pairs; those expected below 5 in either sample pooled
cells, other = [], [0, 0]
for k in set(a) | set(b):
    t = a[k] + b[k]
    if t * min(na, nb) / (na + nb) < 5:
        other[0] += a[k]; other[1] += b[k]
    else:
        cells.append((a[k], b[k]))
if sum(other):
    cells.append(tuple(other))
chi2 = 0.0
for x, y in cells:
    t = x + y
    ea, eb = t * na / (na + nb), t * nb / (na + nb)
    chi2 += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
df = len(cells) - 1
crit = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}
ok = na == nb and 1 <= df <= 10 and chi2 < crit[df]
print(f"{'ok' if ok else 'bad'} {na} {nb} {df} {chi2:.2f} {crit.get(df, 0)}")
EOF
)
read -r verdict na nb df chi2 crit <<<"$res"
[ "$verdict" = ok ] && ok "sampling (T 1, top-k 3, 2 tokens, $N seeds each): chi2 $chi2 < $crit (df $df, alpha 0.001)" ||
	bad "sampling distribution with MTP" "$res"$'\n'"$(sort "$T/with" | uniq -c | sort -rn | head)"$'\n'"$(sort "$T/without" | uniq -c | sort -rn | head)"
d2=$(num drafted "$st")
[ "${d2:-0}" -ge $N ] && ok "sampling runs drafted ($d2 drafts, $(num accepted "$st") accepted)" || bad "sampling drafted" "$st"

[ -s "$T/ties" ] && sed 's/^/     | /' "$T/ties"
kill -TERM "$DPID"
wait "$DPID"
check "$?" 0 "dsd exits 0"
DPID=
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
