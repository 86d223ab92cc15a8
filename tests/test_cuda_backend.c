/* The CUDA backend against the CPU reference backend (a second, float32 code
 * path) on random V3 (bf16, FP8, with MTP) and V2 models that
 * tools/make_bench_models.py --tiny writes into $DS_GPU_MODELS, and the default
 * model's FP8 copy (models/dsv3-tiny/fp8): logits of a
 * full prefill (relative error, top-1 agreement where the reference's top-2
 * margin exceeds 0.05), MTP logits, KV-cache decode equal to the full
 * forward, a batch equal to each sequence alone, copy-on-write of a block,
 * a long prompt in two steps (the prefill attention's query passes).
 * Also graphs vs eager steps, token ids and device draws through the
 * engine. DS_TEST_FILTER=pattern runs the matching tests only (cmocka).
 * Exits 77 without a GPU or without the models. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda_backend.h"
#include "model/engine.h"
#include "model/sampler.h"
#include "tests/fixture_util.h"

static const char *models_dir;

typedef struct {
	ds_model *m;
	ds_engine *cpu, *gpu;
	int fp8;
} env;

/* A model of $DS_GPU_MODELS, or (a name with a '/') of this source tree. */
static ds_model *open_model(const char *name)
{
	char dir[1024];
	snprintf(dir, sizeof(dir), "%s/%s", strchr(name, '/') ? fx_srcdir() : models_dir, name);
	ds_model *m;
	ds_err e = { { 0 } };
	if (ds_model_open(dir, 0, &m, &e))
		fail_msg("%s", e.msg);
	return m;
}

static void env_open_eager(env *v, const char *name, int eager)
{
	memset(v, 0, sizeof(*v));
	ds_err e = { { 0 } };
	v->m = open_model(name);
	v->fp8 = v->m->cfg.fp8;
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.threads = 0;
	c.block_tokens = 16;
	c.kv_blocks = 128;
	if (ds_engine_create(v->m, &c, &v->cpu, &e))
		fail_msg("cpu: %s", e.msg);
	c.backend = "cuda";
	c.eager = eager;
	if (ds_engine_create(v->m, &c, &v->gpu, &e))
		fail_msg("cuda: %s", e.msg);
}

static void env_open(env *v, const char *name) { env_open_eager(v, name, 0); }

static void env_close(env *v)
{
	ds_engine_free(v->cpu);
	ds_engine_free(v->gpu);
	ds_model_free(v->m);
}

static void prompt(int32_t *ids, int n, int V, unsigned seed)
{
	for (int i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		ids[i] = (int32_t)((seed >> 8) % (unsigned)V);
	}
}

typedef struct {
	double rel, maxabs, row_med, row_max;
	int top1_checked, top1_agree;
} cmp;

static int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static cmp compare(const float *got, const float *ref, int rows, int V)
{
	cmp r = { 0 };
	double num = 0, den = 0, *row = malloc(sizeof(double) * (size_t)rows);
	for (int i = 0; i < rows; i++) {
		const float *g = got + (size_t)i * V, *f = ref + (size_t)i * V;
		int bg = 0, b1 = 0, b2 = -1;
		double rn = 0, rd = 0;
		for (int v = 0; v < V; v++) {
			double d = (double)g[v] - f[v];
			if (isnan(g[v]))
				d = INFINITY;
			num += d * d;
			den += (double)f[v] * f[v];
			rn += d * d;
			rd += (double)f[v] * f[v];
			if (fabs(d) > r.maxabs)
				r.maxabs = fabs(d);
			if (g[v] > g[bg])
				bg = v;
			if (f[v] > f[b1]) {
				b2 = b1;
				b1 = v;
			} else if (v != b1 && (b2 < 0 || f[v] > f[b2])) {
				b2 = v;
			}
		}
		if (b2 >= 0 && f[b1] - f[b2] > 0.05f) {
			r.top1_checked++;
			r.top1_agree += bg == b1;
		}
		row[i] = sqrt(rn / (rd > 0 ? rd : 1));
	}
	r.rel = sqrt(num / (den > 0 ? den : 1));
	qsort(row, (size_t)rows, sizeof(double), cmpd);
	r.row_med = row[rows / 2];
	r.row_max = row[rows - 1];
	free(row);
	return r;
}

static float *step_all(ds_engine *eng, ds_seq *s, const int32_t *ids, int n, float *hidden)
{
	const int V = ds_engine_model(eng)->cfg.vocab_size;
	float *lg = malloc(sizeof(float) * (size_t)n * V);
	ds_step_item it = { .seq = s, .tokens = ids, .n = n, .logits = DS_LOGITS_ALL };
	ds_err e = { { 0 } };
	if (ds_engine_step(eng, &it, 1, lg, hidden, &e))
		fail_msg("step: %s", e.msg);
	return lg;
}

/* Prefill logits and (V3) MTP logits, CUDA against CPU. */
static void check_model(const char *name)
{
	env v;
	env_open(&v, name);
	/* 80 tokens: the GEMM prefill attention (>= 64 new tokens) and the
	 * device-planned experts; test_paths covers the host-planned ones. */
	const int V = v.m->cfg.vocab_size, H = v.m->cfg.hidden_size, n = 80;
	int32_t ids[80];
	prompt(ids, n, V, 7);
	ds_seq *sc, *sg;
	assert_int_equal(ds_seq_new(v.cpu, &sc), 0);
	assert_int_equal(ds_seq_new(v.gpu, &sg), 0);
	float *hc = malloc(sizeof(float) * (size_t)n * H), *hg = malloc(sizeof(float) * (size_t)n * H);
	float *lc = step_all(v.cpu, sc, ids, n, hc);
	float *lgpu = step_all(v.gpu, sg, ids, n, hg);
	cmp r = compare(lgpu, lc, n, V);
	cmp rh = compare(hg, hc, n, H);
	print_message("%s: logits rel err %.3g (rows: median %.3g, max %.3g), max |d| %.3g, top-1 %d/%d where margin > "
		      "0.05; final hidden rel err %.3g (median row %.3g)\n",
		      name, r.rel, r.row_med, r.row_max, r.maxabs, r.top1_agree, r.top1_checked, rh.rel, rh.row_med);
	/* A token whose expert choice flips on a near-tie differs a lot; the
	 * median row bounds the arithmetic error. */
	const double tol = v.fp8 ? 0.1 : 0.03;
	if (!(r.row_med < tol && rh.row_med < tol))
		fail_msg("%s: median row error %g (hidden %g) > %g", name, r.row_med, rh.row_med, tol);
	if (r.top1_agree < (v.fp8 ? r.top1_checked * 9 / 10 : r.top1_checked * 19 / 20))
		fail_msg("%s: top-1 agrees at %d of %d positions", name, r.top1_agree, r.top1_checked);
	if (v.m->n_mtp > 0) {
		/* MTP step: tokens 1..n-1 with the main model's hidden states 0..n-2. */
		ds_step_item ic = { .seq = sc, .tokens = ids + 1, .n = n - 1, .logits = DS_LOGITS_ALL };
		ds_step_item ig = { .seq = sg, .tokens = ids + 1, .n = n - 1, .logits = DS_LOGITS_ALL };
		float *mc = malloc(sizeof(float) * (size_t)(n - 1) * V), *mg = malloc(sizeof(float) * (size_t)(n - 1) * V);
		ds_err e = { { 0 } };
		if (ds_engine_mtp_step(v.cpu, 0, &ic, 1, hc, mc, NULL, &e))
			fail_msg("cpu mtp: %s", e.msg);
		if (ds_engine_mtp_step(v.gpu, 0, &ig, 1, hc, mg, NULL, &e))
			fail_msg("cuda mtp: %s", e.msg);
		cmp rm = compare(mg, mc, n - 1, V);
		print_message("%s: MTP logits rel err %.3g (median row %.3g), max |d| %.3g, top-1 %d/%d\n", name, rm.rel,
			      rm.row_med, rm.maxabs, rm.top1_agree, rm.top1_checked);
		if (!(rm.row_med < tol))
			fail_msg("%s: MTP median row error %g", name, rm.row_med);
		free(mc);
		free(mg);
	}
	ds_seq_free(sc);
	ds_seq_free(sg);
	free(lc);
	free(lgpu);
	free(hc);
	free(hg);
	env_close(&v);
}

static void test_v3_bf16(void **st) { (void)st; check_model("v3-bf16"); }
static void test_v3_fp8(void **st) { (void)st; check_model("v3-fp8"); }
static void test_v2_bf16(void **st) { (void)st; check_model("v2-bf16"); }
/* The default model's FP8 copy: its expert down projections (96 wide) are
 * dequantized at load while gate and up stay FP8 (a mixed expert path). */
#define DEFAULT_FP8 "models/dsv3-tiny/fp8"
static void test_default_fp8(void **st) { (void)st; check_model(DEFAULT_FP8); }

/* A long prompt in two steps, CUDA against CPU, the logits of both: n1
 * tokens (the prefill attention's query passes of 512 and the rest), then n2
 * more after them (passes whose queries start at position n1). */
static void check_long_prefill(const char *name, int n1, int n2)
{
	env v;
	env_open(&v, name);
	const int V = v.m->cfg.vocab_size;
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n1 + n2));
	prompt(ids, n1 + n2, V, 23);
	ds_seq *sc, *sg;
	assert_int_equal(ds_seq_new(v.cpu, &sc), 0);
	assert_int_equal(ds_seq_new(v.gpu, &sg), 0);
	float *lc1 = step_all(v.cpu, sc, ids, n1, NULL), *lg1 = step_all(v.gpu, sg, ids, n1, NULL);
	float *lc = step_all(v.cpu, sc, ids + n1, n2, NULL), *lg = step_all(v.gpu, sg, ids + n1, n2, NULL);
	cmp r1 = compare(lg1, lc1, n1, V), r = compare(lg, lc, n2, V);
	print_message("%s: a %d-token step: logits rows median %.3g, top-1 %d/%d; tokens %d-%d after it: logits rel "
		      "err %.3g (rows: median %.3g, max %.3g), top-1 %d/%d where margin > 0.05\n",
		      name, n1, r1.row_med, r1.top1_agree, r1.top1_checked, n1, n1 + n2 - 1, r.rel, r.row_med, r.row_max,
		      r.top1_agree, r.top1_checked);
	const double tol = v.fp8 ? 0.1 : 0.03; /* as check_model */
	const int num = v.fp8 ? 9 : 19, den = v.fp8 ? 10 : 20;
	if (!(r.row_med < tol && r1.row_med < tol))
		fail_msg("%s: median row error %g (first step %g)", name, r.row_med, r1.row_med);
	if (r.top1_agree < r.top1_checked * num / den || r1.top1_agree < r1.top1_checked * num / den)
		fail_msg("%s: top-1 agrees at %d of %d positions (first step %d of %d)", name, r.top1_agree,
			 r.top1_checked, r1.top1_agree, r1.top1_checked);
	ds_seq_free(sc);
	ds_seq_free(sg);
	free(lc1);
	free(lg1);
	free(lc);
	free(lg);
	free(ids);
	env_close(&v);
}

static void test_long_prefill(void **st)
{
	(void)st;
	/* v3: a first step of more than 1024 tokens (DEV_MOE_MAX_T): the grouped
	 * GEMMs on the device's plan, then the same with the plan taken to the
	 * host (DS_CUDA_MOE_HOST_PLAN, read when the backend is created; the
	 * gathered rows share the down projections' output buffer); v2:
	 * decode-sized device-planned steps */
	check_long_prefill("v3-bf16", 1100, 500);
	setenv("DS_CUDA_MOE_HOST_PLAN", "1", 1);
	check_long_prefill("v3-bf16", 1100, 500);
	unsetenv("DS_CUDA_MOE_HOST_PLAN");
	check_long_prefill("v2-bf16", 600, 500);
	/* FP8, 6 experts a token, 1101 tokens: a plan bound (6 * 1101 + 15 * 16)
	 * that is not a multiple of 4 (the FP8 scales' row stride), rounded up
	 * on the device plan; then the host plan (its row count, padded by
	 * expert, always is) */
	check_long_prefill("v2-fp8-k6", 1101, 301);
	setenv("DS_CUDA_MOE_HOST_PLAN", "1", 1);
	check_long_prefill("v2-fp8-k6", 1101, 301);
	unsetenv("DS_CUDA_MOE_HOST_PLAN");
}

/* On the GPU: token-by-token decode through the paged cache equals the full
 * forward (blocks of 16, so tables span several blocks); a batch of two
 * sequences equals each alone. */
static void check_consistency(const char *name)
{
	env v;
	env_open(&v, name);
	/* 70 tokens: the full forward takes the GEMM prefill attention (>= 64
	 * new tokens), decode steps the split-KV kernel. */
	const int V = v.m->cfg.vocab_size, n = 70, split = 13;
	int32_t ids[70];
	prompt(ids, n, V, 11);
	ds_seq *s;
	assert_int_equal(ds_seq_new(v.gpu, &s), 0);
	float *full = step_all(v.gpu, s, ids, n, NULL);
	ds_seq_free(s);
	assert_int_equal(ds_seq_new(v.gpu, &s), 0);
	float *dec = malloc(sizeof(float) * (size_t)n * V);
	free(step_all(v.gpu, s, ids, split, NULL));
	ds_err e = { { 0 } };
	for (int i = split; i < n; i++) {
		ds_step_item it = { .seq = s, .tokens = ids + i, .n = 1, .logits = DS_LOGITS_LAST };
		if (ds_engine_step(v.gpu, &it, 1, dec + (size_t)i * V, NULL, &e))
			fail_msg("decode: %s", e.msg);
	}
	cmp r = compare(dec + (size_t)split * V, full + (size_t)split * V, n - split, V);
	print_message("%s: decode vs full rel err %.3g (rows: median %.3g, max %.3g), max |d| %.3g\n", name, r.rel,
		      r.row_med, r.row_max, r.maxabs);
	/* Decode and prefill take different GEMM kernels (GEMV vs cuBLASLt):
	 * the same function up to summation order, which FP8 rounding and
	 * expert choices can amplify in single rows; a cache bug would not
	 * stay in single rows. */
	/* FP8 activation quantization turns any difference of kernel choice
	 * (1e-4 relative) into a few percent on this small random model, as it
	 * does against the CPU. In bf16 the random V3 model alone amplifies
	 * rounding to about 1 % (H100: 0.0084 with cuBLASLt decode GEMMs, 0.0099
	 * with the GEMV, for the same attention), so 2 %; v2 stays at 0.6 %. A
	 * cache bug (a wrong slot or position) moves rows by tens of percent. */
	const double tol = v.fp8 ? 0.1 : 0.02;
	if (!(r.row_med < tol))
		fail_msg("%s: KV decode differs from the full forward (median row %g)", name, r.row_med);
	ds_seq_free(s);

	/* Batch: sequence A (n tokens, GEMM attention) and B (25 of another
	 * prompt, the kernel on a token list): 95 tokens take the host-planned
	 * MoE path, B alone the device path. */
	int32_t ids2[25];
	prompt(ids2, 25, V, 99);
	ds_seq *a, *b;
	assert_int_equal(ds_seq_new(v.gpu, &b), 0);
	float *alone_b = step_all(v.gpu, b, ids2, 25, NULL);
	ds_seq_free(b);
	assert_int_equal(ds_seq_new(v.gpu, &a), 0);
	assert_int_equal(ds_seq_new(v.gpu, &b), 0);
	ds_step_item items[2] = { { .seq = a, .tokens = ids, .n = n, .logits = DS_LOGITS_ALL },
				  { .seq = b, .tokens = ids2, .n = 25, .logits = DS_LOGITS_ALL } };
	float *both = malloc(sizeof(float) * (size_t)(n + 25) * V);
	if (ds_engine_step(v.gpu, items, 2, both, NULL, &e))
		fail_msg("batch: %s", e.msg);
	cmp ra = compare(both, full, n, V), rb = compare(both + (size_t)n * V, alone_b, 25, V);
	print_message("%s: batched vs alone rel err %.3g / %.3g (median rows %.3g / %.3g)\n", name, ra.rel, rb.rel,
		      ra.row_med, rb.row_med);
	if (!(ra.row_med < tol && rb.row_med < tol))
		fail_msg("%s: batched differs from alone (%g, %g)", name, ra.row_med, rb.row_med);
	ds_seq_free(a);
	ds_seq_free(b);
	free(both);
	free(alone_b);
	free(full);
	free(dec);
	env_close(&v);
}

static void test_consistency_v3_fp8(void **st) { (void)st; check_consistency("v3-fp8"); }
static void test_consistency_v3_bf16(void **st) { (void)st; check_consistency("v3-bf16"); }
static void test_consistency_v2_bf16(void **st) { (void)st; check_consistency("v2-bf16"); }

/* The backend directly: decode against a full forward (GEMM attention) with
 * the decode-only paths (GEMV, device-side MoE) each on and off. */
static double decode_vs_full(const ds_backend_ops *ops, ds_backend *b, const ds_model *m, const int32_t *ids, int n,
			     int split)
{
	const int V = m->cfg.vocab_size, bt = 16;
	int32_t table[16];
	for (int i = 0; i < 16; i++)
		table[i] = 15 - i;
	const int32_t *tabs[1] = { table };
	float *full = malloc(sizeof(float) * (size_t)n * V), *dec = malloc(sizeof(float) * (size_t)n * V);
	int nn = n, p0 = 0, lf = 0;
	ds_batch bf = { .n_seqs = 1, .n_new = &nn, .pos0 = &p0, .tokens = ids, .block_tables = tabs, .logits_from = &lf };
	ds_step_out of = { .logits = full };
	ds_err e = { { 0 } };
	if (ops->forward(b, &bf, &of, &e))
		fail_msg("%s", e.msg);
	nn = split;
	lf = split;
	ds_step_out none = { 0 };
	if (ops->forward(b, &bf, &none, &e))
		fail_msg("%s", e.msg);
	for (int i = split; i < n; i++) {
		int one = 1, pi = i, l0 = 0;
		ds_batch d1 = { .n_seqs = 1, .n_new = &one, .pos0 = &pi, .tokens = ids + i, .block_tables = tabs, .logits_from = &l0 };
		ds_step_out o1 = { .logits = dec + (size_t)i * V };
		if (ops->forward(b, &d1, &o1, &e))
			fail_msg("%s", e.msg);
	}
	cmp r = compare(dec + (size_t)split * V, full + (size_t)split * V, n - split, V);
	free(full);
	free(dec);
	(void)bt;
	return r.row_med;
}

static void test_paths(void **st)
{
	(void)st;
	const char *names[] = { "v3-bf16", "v2-bf16", "v3-fp8", DEFAULT_FP8 };
	for (int k = 0; k < 4; k++) {
		ds_model *m = open_model(names[k]);
		ds_err e = { { 0 } };
		ds_backend_config bc = { .block_tokens = 16, .kv_blocks = 16 };
		ds_backend *b;
		if (ds_cuda_backend.create(m, &bc, &b, &e))
			fail_msg("%s", e.msg);
		int32_t ids[70];
		prompt(ids, 70, m->cfg.vocab_size, 11);
		double worst = 0;
		/* device moe off: every step over the bound (0), planned on the
		 * device (grouped GEMMs where rows suffice) or on the host */
		for (int cfgi = 0; cfgi < 6; cfgi++) {
			ds_cuda_backend_set_gemv(b, cfgi & 1);
			ds_cuda_backend_set_device_moe(b, cfgi & 2 ? 64 : 0);
			ds_cuda_backend_set_host_plan(b, (cfgi & 4) != 0);
			double r = decode_vs_full(&ds_cuda_backend, b, m, ids, 70, 13);
			print_message("%s: decode vs full (gemv %s, device moe %s, host plan %s): median row rel err "
				      "%.3g\n", names[k], cfgi & 1 ? "on" : "off", cfgi & 2 ? "on" : "off",
				      cfgi & 4 ? "on" : "off", r);
			if (!(r <= worst))
				worst = r;
		}
		const double tol = m->cfg.fp8 ? 0.1 : 0.02; /* see check_consistency */
		ds_cuda_backend.destroy(b);
		ds_model_free(m);
		if (!(worst < tol))
			fail_msg("%s: decode differs from the full forward (median row %g)", names[k], worst);
	}
}

/* Steps replayed from CUDA graphs compute exactly what the same steps
 * launched kernel by kernel compute: logits and hidden states bit-identical
 * across captures, replays, MTP steps, a one-sequence step, and a long
 * prefill in between that grows the workspace (the captured graphs point
 * into the old one and must be dropped, or the replays read freed memory). */
typedef struct {
	float *v;
	size_t n, cap;
} fbuf;

static float *fb_take(fbuf *f, size_t n)
{
	if (f->n + n > f->cap) {
		f->cap = (f->n + n) * 2;
		f->v = realloc(f->v, sizeof(float) * f->cap);
		assert_non_null(f->v);
	}
	f->n += n;
	return f->v + f->n - n;
}

static void graph_script(const ds_model *m, ds_backend *b, fbuf *out)
{
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size, NS = 5;
	int32_t tab[5][8], ids[512];
	const int32_t *tabs[5];
	for (int s = 0; s < NS; s++) {
		for (int i = 0; i < 8; i++)
			tab[s][i] = s * 8 + (7 - i);
		tabs[s] = tab[s];
	}
	prompt(ids, 512, V, 23);
	float *hid = malloc(sizeof(float) * 128 * (size_t)H);
	for (int i = 0; i < 128 * H; i++)
		hid[i] = (float)sin(0.37 * i) * 2.0f;
	int pos[5] = { 0 }, mpos[5] = { 0 }, next = 0;
	ds_err e = { { 0 } };
	for (int step = -1; step < 24; step++) {
		int n_new[5], p0[5], lf[5], ns = 4, T = 0, mtp = 0;
		int kind = step < 0 ? -1 : step == 12 ? 9 : step % 4;
		if (kind == 2 && m->n_mtp == 0)
			kind = 0;
		if (kind == 9) {
			/* The fifth sequence's 100-token prompt: a larger workspace. */
			ns = 1;
			tabs[0] = tab[4];
			n_new[0] = 100;
			p0[0] = 0;
			lf[0] = 99;
			T = 100;
		} else {
			tabs[0] = tab[0];
			if (kind == 3)
				ns = 1;
			for (int s = 0; s < ns; s++) {
				n_new[s] = kind < 0 ? 20 : kind == 1 ? 2 : 1;
				p0[s] = kind == 2 ? mpos[s] : pos[s];
				lf[s] = kind < 0 ? 19 : 0;
				T += n_new[s];
			}
			mtp = kind == 2;
		}
		int rows = 0;
		for (int s = 0; s < ns; s++)
			rows += n_new[s] - lf[s];
		ds_batch bt = { .n_seqs = ns, .n_new = n_new, .pos0 = p0, .tokens = ids + (next % 300), .block_tables = tabs,
				.logits_from = lf, .mtp = mtp, .hidden_in = mtp ? hid : NULL };
		/* One take: a second could move the first. */
		float *o_lg = fb_take(out, (size_t)rows * V + (size_t)T * H);
		ds_step_out o = { .logits = o_lg, .hidden = o_lg + (size_t)rows * V };
		if (ds_cuda_backend.forward(b, &bt, &o, &e))
			fail_msg("step %d: %s", step, e.msg);
		next += T;
		if (kind != 9)
			for (int s = 0; s < ns; s++)
				*(mtp ? &mpos[s] : &pos[s]) += n_new[s];
	}
	free(hid);
}

static void test_graphs(void **st)
{
	(void)st;
	const char *names[] = { "v3-bf16", "v2-bf16", "v3-fp8", DEFAULT_FP8 };
	for (int k = 0; k < 4; k++) {
		ds_model *m = open_model(names[k]);
		ds_err e = { { 0 } };
		fbuf got[2] = { { 0 } };
		long rep[2], cap[2], eag[2];
		for (int eager = 0; eager < 2; eager++) {
			ds_backend_config bc = { .block_tokens = 16, .kv_blocks = 64, .eager = eager };
			ds_backend *b;
			if (ds_cuda_backend.create(m, &bc, &b, &e))
				fail_msg("%s", e.msg);
			graph_script(m, b, &got[eager]);
			ds_cuda_backend_graph_stats(b, &rep[eager], &cap[eager], &eag[eager]);
			ds_cuda_backend.destroy(b);
		}
		print_message("%s: graphs: %ld steps replayed, %ld graphs captured, %ld eager; %zu floats compared\n",
			      names[k], rep[0], cap[0], eag[0], got[0].n);
		assert_int_equal(got[0].n, got[1].n);
		size_t diff = 0;
		for (size_t i = 0; i < got[0].n; i++)
			diff += memcmp(&got[0].v[i], &got[1].v[i], sizeof(float)) != 0;
		if (diff)
			fail_msg("%s: %zu of %zu outputs differ between graph replays and eager steps", names[k], diff,
				 got[0].n);
		/* Replays happened, and the workspace growth forced new captures. */
		assert_true(rep[0] >= 8);
		assert_true(cap[0] >= 4);
		assert_int_equal(rep[1] + cap[1], 0);
		free(got[0].v);
		free(got[1].v);
		ds_model_free(m);
	}
}

/* Against transformers (tests/fixtures, tools/make_fixtures.py): logits of
 * every fixture sequence, top-1 where the reference's top-2 margin exceeds
 * 0.05 (95 % of them with bf16 weights and activations on the GPU, 90 % for
 * FP8, whose activations are quantized), max |d| reported. The FP8 fixture's shapes are not
 * multiples of 128: it runs on the dequantized fallback. */
static int check_fixture(const char *name)
{
	fx_ref ref;
	if (fx_load(name, &ref))
		fail_msg("fixture %s missing", name);
	ds_model *m;
	ds_err e = { { 0 } };
	if (ds_model_open(ref.dir, 0, &m, &e))
		fail_msg("%s", e.msg);
	ds_engine_config c;
	ds_engine_config_default(&c);
	c.backend = "cuda";
	c.block_tokens = 16;
	c.kv_blocks = 256;
	ds_engine *eng;
	if (ds_engine_create(m, &c, &eng, &e))
		fail_msg("%s", e.msg);
	const int V = m->cfg.vocab_size;
	int agree = 0, checked = 0;
	double worst = 0, worst_rel = 0;
	for (int i = 0; i < ref.n_seqs; i++) {
		fx_seq *q = &ref.seqs[i];
		float *rl;
		size_t r, cc;
		assert_int_equal(fx_npy(&ref, q->logits, &rl, &r, &cc), 0);
		assert_int_equal((int)r, q->n);
		ds_seq *s;
		assert_int_equal(ds_seq_new(eng, &s), 0);
		float *lg = step_all(eng, s, q->ids, q->n, NULL);
		cmp x = compare(lg, rl, q->n, V);
		agree += x.top1_agree;
		checked += x.top1_checked;
		if (x.maxabs > worst)
			worst = x.maxabs;
		if (x.rel > worst_rel)
			worst_rel = x.rel;
		ds_seq_free(s);
		free(lg);
		free(rl);
	}
	print_message("fixture %s (%s): %d sequences, top-1 %d/%d where margin > 0.05, max |d| %.3g, worst rel err %.3g\n",
		      name, m->cfg.fp8 ? "fp8" : "bf16 on the GPU", ref.n_seqs, agree, checked, worst, worst_rel);
	/* Goal (issue 7): every such position. Held here: 95 % (90 % FP8);
	 * the shortfall is reported in docs/PERFORMANCE.md. */
	const int need = m->cfg.fp8 ? checked * 9 / 10 : checked * 19 / 20;
	ds_engine_free(eng);
	ds_model_free(m);
	fx_free(&ref);
	assert_true(checked > 0);
	return agree >= need;
}

static void test_fixtures(void **st)
{
	(void)st;
	int ok = check_fixture("v3");
	ok &= check_fixture("v2lite");
	ok &= check_fixture("fp8");
	if (!ok)
		fail_msg("top-1 agreement with transformers below the bound (above)");
}

/* The GPU backend refuses bad input with an error, not a crash. */
/* Expert load on the GPU: every routed (token, expert) pair counted once,
 * through the device-planned (short steps) and host-planned (long) paths. */
static void test_expert_load(void **st)
{
	(void)st;
	env v;
	env_open(&v, "v3-bf16");
	const ds_model *m = v.m;
	const int E = m->cfg.n_routed_experts, K = m->cfg.num_experts_per_tok, NL = m->n_layers + m->n_mtp;
	const int n1 = 40, n2 = 100, V = m->cfg.vocab_size;
	int32_t ids[140];
	prompt(ids, n1 + n2, V, 7);
	ds_seq *s;
	assert_int_equal(ds_seq_new(v.gpu, &s), 0);
	free(step_all(v.gpu, s, ids, n1, NULL));
	for (int i = 0; i < 3; i++)
		free(step_all(v.gpu, s, ids + n1 + i, 1, NULL));
	free(step_all(v.gpu, s, ids + n1 + 3, n2 - 3, NULL));
	uint64_t *c = calloc((size_t)NL * E, sizeof(uint64_t));
	assert_int_equal(ds_engine_expert_load(v.gpu, c), 0);
	for (int l = 0; l < m->n_layers; l++) {
		uint64_t sum = 0;
		for (int x = 0; x < E; x++)
			sum += c[(size_t)l * E + x];
		uint64_t want = m->layers[l].is_moe ? (uint64_t)(n1 + n2) * K : 0;
		if (sum != want)
			fail_msg("layer %d: %llu pairs counted, want %llu", l, (unsigned long long)sum, (unsigned long long)want);
	}
	printf("v3-bf16: expert load counted %d tokens x top-%d per MoE layer on the GPU\n", n1 + n2, K);
	free(c);
	ds_seq_free(s);
	env_close(&v);
}

/* ds_engine_step_ids on the GPU: ids from the device argmax, logit rows
 * downloaded only where needed (tests/fixture_util.c). */
static void test_step_ids(void **st)
{
	(void)st;
	const char *names[] = { "v3-bf16", "v2-bf16" };
	for (int k = 0; k < 2; k++) {
		env v;
		env_open(&v, names[k]);
		int32_t ids[32];
		prompt(ids, 32, v.m->cfg.vocab_size, 5);
		char why[256] = "";
		if (fx_check_step_ids(v.gpu, ids, 32, why, sizeof(why)))
			fail_msg("%s: %s", names[k], why);
		env_close(&v);
	}
}

/* ds_engine_step_chain on the GPU (the MTP steps inside the same call, their
 * tokens, hidden inputs and positions taken on the device) against the steps
 * run one after the other through the host (tests/fixture_util.c), bit for
 * bit, at depths 1-4, graphs on (the second and third steps replay them)
 * and off. */
static void test_step_chain(void **st)
{
	(void)st;
	const char *names[] = { "v3-bf16", "v3-fp8" };
	for (int k = 0; k < 2; k++)
		for (int eager = 0; eager < 2; eager++) {
			env v;
			env_open_eager(&v, names[k], eager);
			int32_t ids[32];
			prompt(ids, 32, v.m->cfg.vocab_size, 11 + k);
			char why[256] = "";
			for (int depth = 1; depth <= 4; depth++)
				if (fx_check_step_chain(v.gpu, ids, 32, depth, why, sizeof(why)))
					fail_msg("%s%s depth %d: %s", names[k], eager ? " eager" : "", depth, why);
			env_close(&v);
		}
}

/* Device draws through the engine: for 24 uniforms (away from the
 * boundaries between tokens), the token drawn on the GPU is the one the
 * host sampler's distribution (model/sampler.c) gives for that uniform,
 * over the logits the same step returns without a draw. */
static void test_step_draw(void **st)
{
	(void)st;
	env v;
	env_open(&v, "v2-bf16");
	const int V = v.m->cfg.vocab_size;
	assert_true(ds_engine_draws(v.gpu));
	int32_t ids[16];
	prompt(ids, 16, V, 9);
	ds_sampling sp;
	ds_sampling_default(&sp);
	sp.temperature = 1.2f;
	sp.top_p = 0.95f;
	sp.top_k = 200;
	sp.min_p = 0.01f;
	ds_sampler *smp;
	assert_int_equal(ds_sampler_new(&sp, V, &smp), 0);
	float *lg = malloc(sizeof(float) * (size_t)V), *p = malloc(sizeof(float) * (size_t)V);
	ds_err e = { { 0 } };
	/* the reference logits of the last position */
	ds_seq *s;
	assert_int_equal(ds_seq_new(v.gpu, &s), 0);
	ds_step_item it = { .seq = s, .tokens = ids, .n = 16, .logits = DS_LOGITS_LAST };
	if (ds_engine_step(v.gpu, &it, 1, lg, NULL, &e))
		fail_msg("%s", e.msg);
	ds_seq_free(s);
	ds_sampler_probs(smp, lg, p);
	int checked = 0;
	for (int k = 0; k < 24; k++) {
		const float u = (k + 0.37f) / 24;
		double c = 0, gap = 1;
		int want = -1;
		for (int i = 0; i < V; i++) {
			if (p[i] <= 0)
				continue;
			c += p[i];
			gap = fmin(gap, fabs(c - u));
			if (want < 0 && u < c)
				want = i;
		}
		if (gap < 1e-4)
			continue; /* at a boundary rounding decides */
		ds_draw d = { .temperature = sp.temperature, .top_p = sp.top_p, .min_p = sp.min_p, .u = u, .top_k = sp.top_k };
		assert_int_equal(ds_seq_new(v.gpu, &s), 0);
		ds_step_item di = { .seq = s, .tokens = ids, .n = 16, .logits = DS_LOGITS_LAST, .draw = &d };
		int32_t got = -1;
		if (ds_engine_step_ids(v.gpu, &di, 1, lg, &got, NULL, &e))
			fail_msg("%s", e.msg);
		ds_seq_free(s);
		if (got != want)
			fail_msg("u %.4f: the GPU drew %d, the host distribution gives %d", u, got, want);
		checked++;
	}
	print_message("v2-bf16: %d device draws equal the host sampler's token for the same uniform\n", checked);
	assert_true(checked >= 20);
	ds_sampler_free(smp);
	free(lg);
	free(p);
	env_close(&v);
}

static void test_bad_input(void **st)
{
	(void)st;
	env v;
	env_open(&v, "v2-bf16");
	ds_seq *s;
	assert_int_equal(ds_seq_new(v.gpu, &s), 0);
	int32_t bad[2] = { 3, v.m->cfg.vocab_size + 5 };
	ds_step_item it = { .seq = s, .tokens = bad, .n = 2, .logits = DS_LOGITS_LAST };
	ds_err e = { { 0 } };
	float *lg = malloc(sizeof(float) * (size_t)v.m->cfg.vocab_size);
	assert_true(ds_engine_step(v.gpu, &it, 1, lg, NULL, &e) < 0);
	assert_true(strlen(e.msg) > 0);
	free(lg);
	ds_seq_free(s);
	env_close(&v);
}

int main(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("test_cuda_backend: no GPU, skipped\n");
		return 77;
	}
	models_dir = getenv("DS_GPU_MODELS");
	char probe[1024];
	snprintf(probe, sizeof(probe), "%s/v2-bf16/.complete", models_dir ? models_dir : "");
	if (!models_dir || access(probe, F_OK)) {
		printf("test_cuda_backend: DS_GPU_MODELS has no models (tools/make_bench_models.py --tiny), skipped\n");
		return 77;
	}
	if (getenv("DS_TEST_FILTER"))
		cmocka_set_test_filter(getenv("DS_TEST_FILTER"));
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_v3_bf16),
		cmocka_unit_test(test_v3_fp8),
		cmocka_unit_test(test_v2_bf16),
		cmocka_unit_test(test_default_fp8),
		cmocka_unit_test(test_long_prefill),
		cmocka_unit_test(test_consistency_v3_fp8),
		cmocka_unit_test(test_consistency_v3_bf16),
		cmocka_unit_test(test_consistency_v2_bf16),
		cmocka_unit_test(test_paths),
		cmocka_unit_test(test_graphs),
		cmocka_unit_test(test_fixtures),
		cmocka_unit_test(test_expert_load),
		cmocka_unit_test(test_step_ids),
		cmocka_unit_test(test_step_chain),
		cmocka_unit_test(test_step_draw),
		cmocka_unit_test(test_bad_input),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
