/* bench_tokenizer.c — `make bench-tokenizer`: single-thread encode/decode throughput of the
 * tokenizer on a deterministic mixed corpus, and the load time of a tokenizer directory.
 * The corpus is built from the fixture strings (tests/fixtures/tokenizer/encode.jsonl: prose in
 * many scripts, code, numbers, whitespace, emoji, special tokens, long words), shuffled into
 * documents by a fixed-seed PRNG until --mb megabytes. --corpus-out writes it as JSON Lines and
 * --ids-out the ids (per document: uint32 count, then int32 ids) so tools/bench_tokenizer.py
 * can time HF tokenizers on the same text and check the ids agree. Figures: median of --runs. */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/tokenizer.h"
#include "tests/bench_util.h"

static uint64_t rng_state = 0x5eed1234abcdull;
static uint64_t rnd(void) /* splitmix64 */
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

typedef struct {
	char *p;
	size_t n;
} str;

static int load_strings(const char *path, str **out, size_t *count)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	char *line = NULL;
	size_t cap = 0, n = 0, acap = 1024;
	ssize_t len;
	str *a = malloc(acap * sizeof(*a));
	while ((len = getline(&line, &cap, f)) > 0) {
		cJSON *j = cJSON_ParseWithLength(line, (size_t)len);
		const cJSON *t = cJSON_GetObjectItem(j, "text");
		if (cJSON_IsString(t) && t->valuestring[0]) {
			if (n == acap)
				a = realloc(a, (acap *= 2) * sizeof(*a));
			a[n].p = strdup(t->valuestring);
			a[n].n = strlen(a[n].p);
			n++;
		}
		cJSON_Delete(j);
	}
	free(line);
	fclose(f);
	*out = a;
	*count = n;
	return n ? 0 : -1;
}

static void json_str(FILE *f, const char *s, size_t n)
{
	fputc('"', f);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\')
			fprintf(f, "\\%c", c);
		else if (c < 0x20)
			fprintf(f, "\\u%04x", c);
		else
			fputc(c, f);
	}
	fputs("\"\n", f);
}

int main(int argc, char **argv)
{
	const char *dir = NULL, *corpus_out = NULL, *ids_out = NULL;
	const char *fixtures = "tests/fixtures/tokenizer/encode.jsonl";
	double mb = 12;
	int runs = 5;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
			dir = argv[++i];
		else if (!strcmp(argv[i], "--mb") && i + 1 < argc)
			mb = atof(argv[++i]);
		else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
			runs = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--corpus-out") && i + 1 < argc)
			corpus_out = argv[++i];
		else if (!strcmp(argv[i], "--ids-out") && i + 1 < argc)
			ids_out = argv[++i];
		else if (!strcmp(argv[i], "--fixtures") && i + 1 < argc)
			fixtures = argv[++i];
		else {
			fprintf(stderr, "usage: bench_tokenizer --tokenizer DIR [--mb N] [--runs N] "
				"[--corpus-out FILE] [--ids-out FILE] [--fixtures encode.jsonl]\n");
			return 2;
		}
	}
	if (!dir || runs < 1 || runs > 100 || mb <= 0) {
		fprintf(stderr, "bench_tokenizer: --tokenizer DIR required\n");
		return 2;
	}

	/* Load time. */
	double *lt = malloc((size_t)runs * sizeof(double));
	ds_tok *tok = NULL;
	for (int r = 0; r < runs; r++) {
		ds_err e = { "" };
		double t0 = now();
		if (ds_tok_load_dir(dir, &tok, &e)) {
			fprintf(stderr, "bench_tokenizer: %s\n", e.msg);
			return 1;
		}
		lt[r] = now() - t0;
		if (r + 1 < runs)
			tok = ds_tok_free(tok);
	}
	double load_ms = 1e3 * median(lt, runs);

	/* Corpus: documents of 4..40 fixture strings joined by newlines. */
	str *s;
	size_t ns;
	if (load_strings(fixtures, &s, &ns)) {
		fprintf(stderr, "bench_tokenizer: cannot read %s\n", fixtures);
		return 1;
	}
	size_t target = (size_t)(mb * 1e6), total = 0, nd = 0, dcap = 1024;
	str *docs = malloc(dcap * sizeof(*docs));
	while (total < target) {
		int k = 4 + (int)(rnd() % 37);
		size_t cap = 0;
		size_t pick[40];
		for (int i = 0; i < k; i++) {
			pick[i] = rnd() % ns;
			cap += s[pick[i]].n + 1;
		}
		char *d = malloc(cap + 1);
		size_t o = 0;
		for (int i = 0; i < k; i++) {
			memcpy(d + o, s[pick[i]].p, s[pick[i]].n);
			o += s[pick[i]].n;
			if (i + 1 < k)
				d[o++] = '\n';
		}
		d[o] = 0;
		if (nd == dcap)
			docs = realloc(docs, (dcap *= 2) * sizeof(*docs));
		docs[nd].p = d;
		docs[nd++].n = o;
		total += o;
	}

	/* Encode. */
	int32_t **ids = calloc(nd, sizeof(*ids));
	size_t *nids = calloc(nd, sizeof(*nids)), ntok = 0;
	double *et = malloc((size_t)runs * sizeof(double)), *dt = malloc((size_t)runs * sizeof(double));
	for (int r = 0; r < runs; r++) {
		double t0 = now();
		for (size_t i = 0; i < nd; i++) {
			free(ids[i]);
			ds_err e = { "" };
			if (ds_tok_encode(tok, docs[i].p, docs[i].n, 0, &ids[i], &nids[i], &e)) {
				fprintf(stderr, "bench_tokenizer: encode: %s\n", e.msg);
				return 1;
			}
		}
		et[r] = now() - t0;
	}
	for (size_t i = 0; i < nd; i++)
		ntok += nids[i];
	/* Decode (and check it round-trips). */
	size_t bad = 0;
	for (int r = 0; r < runs; r++) {
		double t0 = now();
		for (size_t i = 0; i < nd; i++) {
			char *txt;
			size_t len;
			if (ds_tok_decode(tok, ids[i], nids[i], 0, &txt, &len, NULL))
				return 1;
			bad += len != docs[i].n || memcmp(txt, docs[i].p, len);
			free(txt);
		}
		dt[r] = now() - t0;
	}
	double enc = median(et, runs), dec = median(dt, runs);
	printf("{\"impl\": \"dsd\", \"corpus_bytes\": %zu, \"documents\": %zu, \"tokens\": %zu, "
	       "\"runs\": %d, \"load_ms\": %.1f, \"encode_s\": %.3f, \"encode_MBps\": %.2f, "
	       "\"encode_tokens_per_s\": %.0f, \"decode_MBps\": %.1f, \"roundtrip_mismatches\": %zu}\n",
	       total, nd, ntok, runs, load_ms, enc, total / enc / 1e6, ntok / enc,
	       total / dec / 1e6, bad);

	if (corpus_out) {
		FILE *f = fopen(corpus_out, "w");
		for (size_t i = 0; f && i < nd; i++)
			json_str(f, docs[i].p, docs[i].n);
		if (!f || fclose(f))
			return 1;
	}
	if (ids_out) {
		FILE *f = fopen(ids_out, "wb");
		for (size_t i = 0; f && i < nd; i++) {
			uint32_t c = (uint32_t)nids[i];
			fwrite(&c, 4, 1, f);
			fwrite(ids[i], 4, nids[i], f);
		}
		if (!f || fclose(f))
			return 1;
	}
	for (size_t i = 0; i < nd; i++) {
		free(ids[i]);
		free(docs[i].p);
	}
	for (size_t i = 0; i < ns; i++)
		free(s[i].p);
	free(s);
	free(docs);
	free(ids);
	free(nids);
	free(et);
	free(dt);
	free(lt);
	ds_tok_free(tok);
	return bad ? 1 : 0;
}
