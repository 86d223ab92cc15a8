#!/bin/bash
# tokenize_cli.sh — `dsd tokenize` / `dsd detokenize` end to end: known ids for the synthetic
# tokenizer (and for DeepSeek-V3's when ../shared/tokenizers/deepseek-v3 is there), round trips
# with escapes and U+0000, and hostile input (bad JSON, bad UTF-8, bad ids, missing files).
# $DS_BUILD is the build folder (default build). Ends with "N passed, N failed".
set -u
dsd=${DS_BUILD:-build}/bin/dsd
syn=tests/fixtures/tokenizer/synthetic/tokenizer.json
real=../shared/tokenizers/deepseek-v3
pass=0 fail=0

check() { # name expected actual
	if [ "$2" == "$3" ]; then pass=$((pass + 1)); else
		fail=$((fail + 1)); printf 'FAIL %s\n  want: %q\n  got:  %q\n' "$1" "$2" "$3"; fi
}
# name expected-status expected-stderr-substring command...
check_err() {
	local name=$1 st=$2 msg=$3; shift 3
	local err; err=$("$@" 2>&1 >/dev/null); local rc=$?
	if [ $rc -eq "$st" ] && [[ "$err" == *"$msg"* ]]; then pass=$((pass + 1)); else
		fail=$((fail + 1)); echo "FAIL $name: status $rc (want $st), stderr: $err"; fi
}

if [ ! -x "$dsd" ]; then echo "no $dsd"; echo "0 passed, 1 failed"; exit 1; fi

check "tokenize synthetic" $'[259,264]\n[265,51,52,53]\n[267,259,268]\n[]' \
	"$(printf '%s\n' '"hello world"' '"12345"' '"<|s|>hello<|tool|>"' '""' | $dsd tokenize --tokenizer $syn)"
check "tokenize --no-special" '[60,124,115,124,62,259,60,124,116,111,111,108,124,62]' \
	"$(echo '"<|s|>hello<|tool|>"' | $dsd tokenize --tokenizer $syn --no-special)"
check "detokenize" $'"hello world"\n"<|s|>hello<|tool|>"' \
	"$(printf '%s\n' '[259,264]' '[267, 259, 268]' | $dsd detokenize --tokenizer $syn)"
check "detokenize --skip-special" '"hello<|tool|>"' \
	"$(echo '[267,259,268]' | $dsd detokenize --tokenizer $syn --skip-special)"
check "broken UTF-8 -> U+FFFD" '"\ufffda"' \
	"$(echo '[228,184,97]' | $dsd detokenize --tokenizer $syn | sed 's/\xef\xbf\xbd/\\ufffd/')"
in='"tab\there \"quoted\" back\\slash nul\u0000end \u00e9\ud83d\ude00 \/"'
check "escapes and U+0000 round trip" '"tab\there \"quoted\" back\\slash nul\u0000end é😀 /"' \
	"$(echo "$in" | $dsd tokenize --tokenizer $syn | $dsd detokenize --tokenizer $syn)"
check "blank lines skipped" '[259]' "$(printf '\n"hello"\n\n' | $dsd tokenize --tokenizer $syn)"

check_err "not a JSON string" 1 "line 2" sh -c "printf '\"ok\"\n[1]\n' | $dsd tokenize --tokenizer $syn"
check_err "unterminated string" 1 "line 1" sh -c "echo '\"abc' | $dsd tokenize --tokenizer $syn"
check_err "bad escape" 1 "line 1" sh -c "echo '\"\\q\"' | $dsd tokenize --tokenizer $syn"
check_err "lone surrogate" 1 "line 1" sh -c "echo '\"\\udc00\"' | $dsd tokenize --tokenizer $syn"
check_err "invalid UTF-8" 1 "UTF-8" sh -c "printf '\"\\377\"\n' | $dsd tokenize --tokenizer $syn"
check_err "id out of range" 1 "270" sh -c "echo '[1,270]' | $dsd detokenize --tokenizer $syn"
check_err "negative id" 1 "line 1" sh -c "echo '[-1]' | $dsd detokenize --tokenizer $syn"
check_err "fractional id" 1 "line 1" sh -c "echo '[1.5]' | $dsd detokenize --tokenizer $syn"
check_err "not an array" 1 "line 1" sh -c "echo '{\"a\":1}' | $dsd detokenize --tokenizer $syn"
check_err "missing tokenizer" 1 "No such file" sh -c "echo '\"x\"' | $dsd tokenize --tokenizer /nonexistent.json"
check_err "malformed tokenizer" 1 "malformed" sh -c "$dsd tokenize --tokenizer tests/tokenize_cli.sh </dev/null"
check_err "no --tokenizer" 2 "usage" $dsd tokenize
check_err "unknown option" 2 "usage" $dsd detokenize --tokenizer $syn --bogus

if [ -s $real/tokenizer.json ]; then
	# Ids from tests/fixtures/tokenizer/chat.jsonl (HF tokenizers).
	check "DeepSeek-V3 ids" '[0,128803,19923,3,128804]' \
		"$(echo '"<｜begin▁of▁sentence｜><｜User｜>Hello!<｜Assistant｜>"' | $dsd tokenize --tokenizer $real)"
	check "DeepSeek-V3 model dir round trip" '"<｜User｜>你好 world\n\tcode()"' \
		"$(echo '"<｜User｜>你好 world\n\tcode()"' | $dsd tokenize --tokenizer $real | $dsd detokenize --tokenizer $real)"
else
	echo "skip: $real absent, DeepSeek-V3 checks not run"
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
