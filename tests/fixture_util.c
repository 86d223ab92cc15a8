#include "tests/fixture_util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/engine.h"
#include "model/npy.h"
#include "model/sampler.h"

const char *fx_srcdir(void)
{
	const char *s = getenv("DS_SRCDIR");
	return s ? s : ".";
}

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *b = malloc((size_t)n + 1);
	if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
		free(b);
		b = NULL;
	}
	fclose(f);
	if (b) {
		b[n] = 0;
		*len = (size_t)n;
	}
	return b;
}

static int ids_from(const cJSON *a, int32_t **out)
{
	int n = cJSON_GetArraySize(a);
	*out = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
	for (int i = 0; i < n; i++)
		(*out)[i] = (int32_t)cJSON_GetArrayItem(a, i)->valuedouble;
	return n;
}

int fx_load(const char *name, fx_ref *r)
{
	memset(r, 0, sizeof(*r));
	snprintf(r->dir, sizeof(r->dir), "%s/tests/fixtures/%s", fx_srcdir(), name);
	char path[600];
	snprintf(path, sizeof(path), "%s/ref/ref.json", r->dir);
	size_t len;
	char *text = slurp(path, &len);
	if (!text)
		return -ENOENT;
	cJSON *root = cJSON_ParseWithLength(text, len);
	free(text);
	const cJSON *seqs = cJSON_GetObjectItem(root, "sequences");
	if (!cJSON_IsArray(seqs)) {
		cJSON_Delete(root);
		return -EINVAL;
	}
	r->n_seqs = cJSON_GetArraySize(seqs);
	r->seqs = calloc((size_t)r->n_seqs, sizeof(fx_seq));
	for (int i = 0; i < r->n_seqs; i++) {
		const cJSON *s = cJSON_GetArrayItem(seqs, i);
		fx_seq *q = &r->seqs[i];
		const cJSON *v;
		if ((v = cJSON_GetObjectItem(s, "name")) && cJSON_IsString(v))
			snprintf(q->name, sizeof(q->name), "%s", v->valuestring);
		q->n = ids_from(cJSON_GetObjectItem(s, "ids"), &q->ids);
		if ((v = cJSON_GetObjectItem(s, "logits")) && cJSON_IsString(v))
			snprintf(q->logits, sizeof(q->logits), "%s", v->valuestring);
		if ((v = cJSON_GetObjectItem(s, "mtp_logits")) && cJSON_IsString(v))
			snprintf(q->mtp_logits, sizeof(q->mtp_logits), "%s", v->valuestring);
		const cJSON *g = cJSON_GetObjectItem(s, "greedy");
		if (cJSON_IsObject(g)) {
			q->greedy_prompt_len = (int)cJSON_GetObjectItem(g, "prompt_len")->valuedouble;
			q->n_greedy = ids_from(cJSON_GetObjectItem(g, "ids"), &q->greedy_ids);
			const cJSON *m = cJSON_GetObjectItem(g, "margins");
			q->greedy_margins = calloc((size_t)(q->n_greedy ? q->n_greedy : 1), sizeof(float));
			for (int j = 0; j < q->n_greedy && j < cJSON_GetArraySize(m); j++)
				q->greedy_margins[j] = (float)cJSON_GetArrayItem(m, j)->valuedouble;
		}
	}
	cJSON_Delete(root);
	return 0;
}

void fx_free(fx_ref *r)
{
	for (int i = 0; i < r->n_seqs; i++) {
		free(r->seqs[i].ids);
		free(r->seqs[i].greedy_ids);
		free(r->seqs[i].greedy_margins);
	}
	free(r->seqs);
	memset(r, 0, sizeof(*r));
}

int fx_npy(const fx_ref *r, const char *file, float **data, size_t *rows, size_t *cols)
{
	char path[700];
	snprintf(path, sizeof(path), "%s/ref/%s", r->dir, file);
	return ds_npy_read_f32(path, data, rows, cols, NULL);
}

int fx_tmpdir(char *out, size_t len)
{
	const char *t = getenv("TMPDIR");
	snprintf(out, len, "%s/dsd-test-XXXXXX", t ? t : "/tmp");
	return mkdtemp(out) ? 0 : -errno;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(p);
}

void fx_rmtree(const char *dir)
{
	nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int fx_copy_file(const char *from, const char *to)
{
	FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
	int rc = (a && b) ? 0 : -errno;
	char buf[65536];
	size_t n;
	while (!rc && (n = fread(buf, 1, sizeof(buf), a)) > 0)
		if (fwrite(buf, 1, n, b) != n)
			rc = -EIO;
	if (a)
		fclose(a);
	if (b && fclose(b))
		rc = -EIO;
	return rc;
}

/* Three sequences: A (argmax only, last row), B (logits, last row), C
 * (argmax only, all rows of a 2-token step). */
static int step_ids_run(ds_engine *eng, const int32_t *ids, int use_ids, float *lg, int32_t *out, char *why,
			size_t whylen)
{
	ds_seq *s[3] = { 0 };
	int rc = 0;
	const int len[3] = { 7, 11, 5 };
	for (int i = 0; i < 3 && !rc; i++) {
		ds_step_item p = { .seq = NULL, .tokens = ids + 3 * i, .n = len[i], .logits = DS_LOGITS_NONE };
		if (!(rc = ds_seq_new(eng, &s[i]))) {
			p.seq = s[i];
			rc = ds_engine_step(eng, &p, 1, NULL, NULL, NULL);
		}
	}
	ds_step_item it[3] = {
		{ .seq = s[0], .tokens = ids + 20, .n = 1, .logits = DS_LOGITS_LAST, .argmax_only = 1 },
		{ .seq = s[1], .tokens = ids + 21, .n = 1, .logits = DS_LOGITS_LAST },
		{ .seq = s[2], .tokens = ids + 22, .n = 2, .logits = DS_LOGITS_ALL, .argmax_only = 1 },
	};
	ds_err e = { { 0 } };
	if (!rc)
		rc = use_ids ? ds_engine_step_ids(eng, it, 3, lg, out, NULL, &e) : ds_engine_step(eng, it, 3, lg, NULL, &e);
	if (rc)
		snprintf(why, whylen, "step: %s (%d)", e.msg, rc);
	for (int i = 0; i < 3; i++)
		ds_seq_free(s[i]);
	return rc ? -1 : 0;
}

int fx_check_step_ids(ds_engine *eng, const int32_t *ids, int n, char *why, size_t whylen)
{
	const int V = ds_engine_model(eng)->cfg.vocab_size, rows = 4;
	float *ref = malloc(sizeof(float) * (size_t)rows * V), *lg = malloc(sizeof(float) * (size_t)rows * V);
	int32_t got[4];
	int rc = ref && lg && n >= 24 ? 0 : -1;
	if (rc)
		snprintf(why, whylen, "out of memory or short prompt");
	if (!rc)
		rc = step_ids_run(eng, ids, 0, ref, NULL, why, whylen);
	if (!rc)
		rc = step_ids_run(eng, ids, 1, lg, got, why, whylen);
	for (int r = 0; !rc && r < rows; r++) {
		const int k = ds_argmax(ref + (size_t)r * V, V);
		if (got[r] != k) {
			snprintf(why, whylen, "row %d: argmax %d, the logits say %d", r, got[r], k);
			rc = -1;
		}
	}
	if (!rc && memcmp(lg + V, ref + V, sizeof(float) * (size_t)V)) {
		snprintf(why, whylen, "the row that needs logits differs from ds_engine_step's");
		rc = -1;
	}
	free(ref);
	free(lg);
	return rc;
}

/* Prompts and first tokens for fx_check_step_chain: both KV levels at the
 * prompt's end, t the argmax after it. */
static int chain_prefill(ds_engine *eng, ds_seq *s, const int32_t *p, int len, int32_t *t, ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	float *lg = malloc(sizeof(float) * (size_t)V), *hid = malloc(sizeof(float) * (size_t)H * len);
	int32_t *nx = malloc(sizeof(int32_t) * (size_t)len);
	int rc = lg && hid && nx ? 0 : -ENOMEM;
	ds_step_item it = { .seq = s, .tokens = p, .n = len, .logits = DS_LOGITS_LAST };
	if (!rc)
		rc = ds_engine_step(eng, &it, 1, lg, hid, e);
	if (!rc) {
		*t = ds_argmax(lg, V);
		memcpy(nx, p + 1, sizeof(int32_t) * (size_t)(len - 1));
		nx[len - 1] = *t;
		ds_step_item mi = { .seq = s, .tokens = nx, .n = len, .logits = DS_LOGITS_NONE };
		rc = ds_engine_mtp_step(eng, 0, &mi, 1, hid, NULL, NULL, e);
	}
	free(lg);
	free(hid);
	free(nx);
	return rc;
}

/* The reference of ds_engine_step_chain's deeper passes (depth > 1), MTP
 * step by MTP step on the twins b: each chained item's accepted row (ib
 * against its next token in), its MTP KV cut back to it, then one position
 * a pass from the previous pass's argmax and output. mb: the MTP argmax rows
 * (2 a chained item), then [depth - 1][nc] here; ho: the first MTP step's
 * output rows. */
static int chain_deep_ref(ds_engine *eng, ds_seq **b, int nc, int depth, const int32_t *in, const int32_t *ib,
			  int32_t *mb, float *ho, float *lg, ds_err *e)
{
	const int H = ds_engine_model(eng)->cfg.hidden_size;
	float *hi = malloc(sizeof(float) * (size_t)nc * H);
	int rc = hi ? 0 : -ENOMEM;
	int32_t tk[8];
	for (int i = 0; !rc && i < nc; i++) {
		const int acc = ib[2 * i] == in[2 * i + 1];
		rc = ds_seq_mtp_truncate(b[i], ds_seq_len(b[i]) - 1 + acc);
		tk[i] = mb[2 * i + acc];
		memcpy(hi + (size_t)i * H, ho + (size_t)(2 * i + acc) * H, sizeof(float) * (size_t)H);
	}
	for (int k = 2; !rc && k <= depth; k++) {
		int32_t *out = mb + 2 * nc + (k - 2) * nc;
		ds_step_item it[8];
		for (int i = 0; i < nc; i++)
			it[i] = (ds_step_item){ .seq = b[i], .tokens = &tk[i], .n = 1, .logits = DS_LOGITS_ALL,
						.argmax_only = 1 };
		rc = ds_engine_mtp_step_ids(eng, 0, it, nc, hi, lg, out, ho, e);
		memcpy(tk, out, sizeof(int32_t) * (size_t)nc);
		memcpy(hi, ho, sizeof(float) * (size_t)nc * H);
	}
	for (int i = 0; !rc && i < nc; i++) /* level with the accepted prefix */
		rc = ds_seq_mtp_truncate(b[i], ds_seq_len(b[i]) - 1 + (ib[2 * i] == in[2 * i + 1]));
	free(hi);
	return rc;
}

int fx_check_step_chain(ds_engine *eng, const int32_t *ids, int n, int depth, char *why, size_t whylen)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	enum { NS = 4, NC = 3, T = 2 * NC + 1, MR = 2 * NC + 3 * NC };
	ds_seq *a[NS] = { 0 }, *b[NS] = { 0 };
	int32_t last[NS], draft0 = ids[1], in[T], ia[T], ib[T], ma[MR], mb[MR];
	float *la = malloc(sizeof(float) * (size_t)T * V), *lb = malloc(sizeof(float) * (size_t)T * V);
	float *ha = malloc(sizeof(float) * (size_t)T * H), *hb = malloc(sizeof(float) * (size_t)T * H);
	float *ho = malloc(sizeof(float) * (size_t)T * H);
	ds_err e = { { 0 } };
	int rc = la && lb && ha && hb && ho && n >= 32 && m->n_mtp > 0 && depth >= 1 && depth <= 4 ? 0 : -1;
	if (rc)
		snprintf(why, whylen, "out of memory, short prompt or no MTP layer");
	for (int i = 0; !rc && i < NS; i++) {
		int32_t tb;
		const int len = n / 2 + 3 * i;
		rc = ds_seq_new(eng, &a[i]) || ds_seq_new(eng, &b[i]) ||
		     chain_prefill(eng, a[i], ids + i, len, &last[i], &e) || chain_prefill(eng, b[i], ids + i, len, &tb, &e);
		if (!rc && tb != last[i])
			rc = -1;
	}
	for (int step = 0; !rc && step < 3; step++) {
		ds_step_item ita[NS], itb[NS], mi[NC];
		for (int i = 0; i < NC; i++) {
			in[2 * i] = last[i];
			/* seq 0 gets its MTP's likely draft back from the last step, the
			 * others a token from the prompt: both outcomes occur */
			in[2 * i + 1] = i == 0 ? draft0 : ids[(5 * step + i) % n];
			ita[i] = (ds_step_item){ .seq = a[i], .tokens = in + 2 * i, .n = 2, .logits = DS_LOGITS_ALL,
						 .argmax_only = 1 };
		}
		in[T - 1] = last[NC];
		ita[NC] = (ds_step_item){ .seq = a[NC], .tokens = in + T - 1, .n = 1, .logits = DS_LOGITS_LAST };
		for (int i = 0; i < NS; i++)
			itb[i] = (ds_step_item){ .seq = b[i], .tokens = ita[i].tokens, .n = ita[i].n, .logits = ita[i].logits,
						 .argmax_only = ita[i].argmax_only };
		rc = ds_engine_step_chain(eng, ita, NS, NC, depth, la, ia, ma, ha, &e);
		if (!rc)
			rc = ds_engine_step_ids(eng, itb, NS, lb, ib, hb, &e);
		for (int i = 0; !rc && i < NC; i++)
			mi[i] = (ds_step_item){ .seq = b[i], .tokens = ib + 2 * i, .n = 2, .logits = DS_LOGITS_ALL,
						.argmax_only = 1 };
		if (!rc)
			rc = ds_engine_mtp_step_ids(eng, 0, mi, NC, hb, lb + (size_t)T * 0, mb, ho, &e);
		if (!rc && depth > 1)
			rc = chain_deep_ref(eng, b, NC, depth, in, ib, mb, ho, lb, &e);
		if (rc) {
			snprintf(why, whylen, "step %d: %s", step, e.msg[0] ? e.msg : "failed");
			break;
		}
		const char *what = memcmp(ia, ib, sizeof(ia)) ? "main ids"
				   : memcmp(ma, mb, sizeof(int32_t) * (size_t)(2 * NC + (depth - 1) * NC)) ? "MTP ids"
				   : memcmp(ha, hb, sizeof(float) * (size_t)T * H) ? "hidden rows"
				   : memcmp(la + (size_t)(T - 1) * V, lb + (size_t)(T - 1) * V, sizeof(float) * (size_t)V)
					   ? "the plain item's logits"
					   : NULL;
		for (int i = 0; !what && i < NS; i++)
			if (ds_seq_len(a[i]) != ds_seq_len(b[i]) || ds_seq_mtp_len(a[i]) != ds_seq_mtp_len(b[i]) ||
			    ds_seq_mtp_len(a[i]) != ds_seq_len(a[i]) - (i == NC ? 1 : depth > 1 ? ia[2 * i] != in[2 * i + 1] : 0))
				what = "KV lengths";
		if (what) {
			snprintf(why, whylen, "step %d: %s differ from the two steps", step, what);
			rc = -1;
			break;
		}
		/* keep what greedy verification keeps: `last` and an accepted draft */
		for (int i = 0; i < NC && !rc; i++) {
			const int acc = ia[2 * i] == in[2 * i + 1];
			const int keep = ds_seq_len(a[i]) - 1 + acc;
			rc = ds_seq_truncate(a[i], keep) || ds_seq_truncate(b[i], keep);
			last[i] = ia[2 * i + acc];
			if (i == 0)
				draft0 = ma[acc];
		}
		/* the plain item's MTP KV catches up like the batcher's extend */
		if (!rc) {
			ds_step_item x[2] = { { .seq = a[NC], .tokens = &ia[T - 1], .n = 1, .logits = DS_LOGITS_NONE },
					      { .seq = b[NC], .tokens = &ib[T - 1], .n = 1, .logits = DS_LOGITS_NONE } };
			rc = ds_engine_mtp_step(eng, 0, &x[0], 1, ha + (size_t)(T - 1) * H, NULL, NULL, &e) ||
			     ds_engine_mtp_step(eng, 0, &x[1], 1, hb + (size_t)(T - 1) * H, NULL, NULL, &e);
			last[NC] = ia[T - 1];
		}
		if (rc)
			snprintf(why, whylen, "step %d: rollback: %s", step, e.msg);
	}
	for (int i = 0; i < NS; i++) {
		ds_seq_free(a[i]);
		ds_seq_free(b[i]);
	}
	free(la);
	free(lb);
	free(ha);
	free(hb);
	free(ho);
	return rc ? -1 : 0;
}
