/* Each CUDA op against its CPU reference (model/cpu_ops.c or a float64 loop
 * here) on fresh random inputs: GEMM bf16 and block-scaled FP8 (also against
 * the CPU with the activations quantized the same way, which pins the scale
 * layouts), RMSNorm with the residual, SiLU*mul, MoE routing (V3 and V2),
 * the permutation + combine, and split-KV MLA attention over a paged cache;
 * the fused launches (two projections, gate+up+SiLU, MLA prep with the W_UK
 * absorption) against the separate ones they replace (the prefill kernels:
 * tests/test_cuda_prefill.c).
 * `test_cuda_ops --bench` times the GEMMs at DeepSeek-V3 shapes, `--bench-attn`
 * the decode attention by split count.
 * Exits 77 without a GPU. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "kernels/act.h"
#include "kernels/attn.h"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/moe.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sample.h"
#include "model/sampler.h"
#include "model/cpu_ops.h"
#include "tests/bench_util.h"
#include "tests/cuda_test_util.h"


static uint8_t e4m3_nearest(float x)
{
	int best = 0;
	float bd = INFINITY;
	for (int c = 0; c < 256; c++) {
		float v = ds_fp8e4m3_lut[c];
		if (isnan(v))
			continue;
		float d = fabsf(v - x);
		if (d < bd) {
			bd = d;
			best = c;
		}
	}
	return (uint8_t)best;
}

static int gemv_on = 1;


/* W [N][K] random, stored bf16 or fp8 with block scales; x [M][K] bf16. */
static void check_gemm(int fp8, int M, int N, int K)
{
	ds_err e = { { 0 } };
	uint16_t *xb = malloc(2 * (size_t)M * K);
	float *xf = malloc(4 * (size_t)M * K);
	for (size_t i = 0; i < (size_t)M * K; i++) {
		xb[i] = ds_f32_to_bf16(frand() * 3);
		xf[i] = ds_bf16_to_f32(xb[i]);
	}
	const int sr = (N + 127) / 128, sc = (K + 127) / 128, sld = (sc + 3) & ~3;
	void *wh = malloc((size_t)N * K * (fp8 ? 1 : 2));
	float *sh = calloc((size_t)sr * sc, 4), *shp = calloc((size_t)sr * sld, 4);
	rand_host_weight(fp8, N, K, wh, sh, shp);
	ds_tensor_ref tw = { .dtype = fp8 ? DS_DT_F8_E4M3 : DS_DT_BF16, .ndim = 2, .shape = { N, K }, .data = wh };
	ds_tensor_ref ts = { .dtype = DS_DT_F32, .ndim = 2, .shape = { sr, sc }, .data = sh };
	ds_wmat W = { .w = &tw, .scale_inv = fp8 ? &ts : NULL, .rows = N, .cols = K };
	float *ref = malloc(4 * (size_t)M * N), *got = malloc(4 * (size_t)M * N);
	ds_cpu_matmul(ref, xf, M, &W);

	const int Mp = dsk_gemm_pad(M);
	uint16_t *xpad = calloc((size_t)Mp * K, 2);
	memcpy(xpad, xb, 2 * (size_t)M * K);
	void *dx = dup_up(xpad, 2 * (size_t)Mp * K), *dw = dup_up(wh, (size_t)N * K * (fp8 ? 1 : 2));
	float *ds = dup_up(shp, 4 * (size_t)sr * sld), *dout = dup_up(NULL, 4 * (size_t)Mp * N);
	dsk_weight dwt = { .type = fp8 ? DSK_W_FP8 : DSK_W_BF16, .rows = N, .cols = K, .w = dw, .scale = ds, .sld = sld };
	dsk_gemm *g;
	assert_int_equal(dsk_gemm_create(NULL, &g, &e), 0);
	dsk_gemm_set_gemv(g, gemv_on);
	int rc = dsk_gemm_run(g, dout, N, dx, M, &dwt, &e);
	if (rc)
		fail_msg("gemm: %s", e.msg);
	assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
	down(got, dout, 4 * (size_t)M * N);
	double r = rel_err(got, ref, (size_t)M * N);
	print_message("gemm %s M=%d N=%d K=%d (%s): rel err vs float32 CPU %.3g\n", fp8 ? "fp8" : "bf16", M, N, K,
		      M <= DSK_GEMV_MAX_M && gemv_on ? "gemv" : "cublasLt", r);
	if (!(r < (fp8 ? 6e-2 : 1e-3)))
		fail_msg("gemm rel err %g", r);
	if (fp8) {
		/* The same math on the CPU: x quantized per 1x128 group. */
		float *xq = malloc(4 * (size_t)M * K);
		for (int m = 0; m < M; m++)
			for (int kb = 0; kb < K / 128; kb++) {
				float amax = 0;
				for (int i = 0; i < 128; i++)
					amax = fmaxf(amax, fabsf(xf[(size_t)m * K + kb * 128 + i]));
				float s = fmaxf(amax, 1e-10f) / 448.0f;
				for (int i = 0; i < 128; i++) {
					size_t j = (size_t)m * K + kb * 128 + i;
					xq[j] = ds_fp8e4m3_lut[e4m3_nearest(xf[j] * (1.0f / s))] * s;
				}
			}
		ds_cpu_matmul(ref, xq, M, &W);
		double rq = rel_err(got, ref, (size_t)M * N);
		print_message("gemm fp8: rel err vs CPU with quantized activations %.3g\n", rq);
		if (!(rq < 2e-3))
			fail_msg("fp8 gemm disagrees with its exact CPU model: %g", rq);
		free(xq);
	}
	dsk_gemm_free(g);
	cudaFree(dx);
	cudaFree(dw);
	cudaFree(ds);
	cudaFree(dout);
	free(xb);
	free(xf);
	free(xpad);
	free(wh);
	free(sh);
	free(shp);
	free(ref);
	free(got);
}

/* Small M goes through the GEMV kernel by default: both paths are checked. */
static void test_gemm_bf16(void **st)
{
	(void)st;
	check_gemm(0, 37, 384, 512);
	for (gemv_on = 1; gemv_on >= 0; gemv_on--) {
		check_gemm(0, 1, 576, 256);
		check_gemm(0, 2, 200, 1032);
		/* the tensor-core GEMV: one and two token tiles, rows past N */
		check_gemm(0, 3, 200, 1032);
		check_gemm(0, 8, 576, 2048);
		check_gemm(0, 13, 72, 264);
		check_gemm(0, 16, 1408, 2816);
	}
	gemv_on = 1;
}
static void test_gemm_fp8(void **st)
{
	(void)st;
	check_gemm(1, 37, 384, 512);
	for (gemv_on = 1; gemv_on >= 0; gemv_on--) {
		check_gemm(1, 2, 576, 1024);
		check_gemm(1, 1, 256, 384);
		check_gemm(1, 3, 256, 384);
		check_gemm(1, 8, 576, 2048);
		check_gemm(1, 11, 1536, 7168);
		check_gemm(1, 16, 208, 1024);
	}
	gemv_on = 1;
}

static void test_rmsnorm_silu(void **st)
{
	(void)st;
	ds_err e = { { 0 } };
	const int T = 9, D = 1000;
	float *x = malloc(4 * T * D), *y = malloc(4 * T * D), *w = malloc(4 * D), *ref = malloc(4 * T * D);
	float *got = malloc(4 * T * D);
	uint16_t *gb = malloc(2 * T * D);
	for (int i = 0; i < T * D; i++) {
		x[i] = frand() * 4;
		y[i] = frand();
	}
	for (int i = 0; i < D; i++)
		w[i] = 1 + frand() * 0.2f;
	float *dx = dup_up(x, 4 * T * D), *dy = dup_up(y, 4 * T * D), *dw = dup_up(w, 4 * D), *dof = dup_up(NULL, 4 * T * D);
	uint16_t *dob = dup_up(NULL, 2 * T * D);
	assert_int_equal(dsk_add_rmsnorm(dx, dy, dw, T, D, 1e-6f, (dsk_bf16 *)dob, D, dof, NULL, NULL, &e), 0);
	for (int i = 0; i < T * D; i++)
		x[i] += y[i];
	for (int t = 0; t < T; t++)
		ds_cpu_rmsnorm(ref + t * D, x + t * D, w, D, 1e-6f);
	down(got, dof, 4 * T * D);
	double r = rel_err(got, ref, (size_t)T * D);
	down(gb, dob, 2 * T * D);
	for (int i = 0; i < T * D; i++)
		got[i] = ds_bf16_to_f32(gb[i]);
	double rb = rel_err(got, ref, (size_t)T * D);
	down(got, dx, 4 * T * D);
	double rx = rel_err(got, x, (size_t)T * D);
	print_message("rmsnorm: rel err %.3g (float32 out), %.3g (bf16 out), residual %.3g\n", r, rb, rx);
	assert_true(r < 1e-6 && rb < 5e-3 && rx < 1e-7);
	/* silu(g) * u */
	assert_int_equal(dsk_silu_mul((dsk_bf16 *)dob, dx, dy, T, D, NULL, &e), 0);
	down(gb, dob, 2 * T * D);
	memcpy(ref, x, 4 * T * D);
	ds_cpu_silu_mul(ref, y, T * D);
	for (int i = 0; i < T * D; i++)
		got[i] = ds_bf16_to_f32(gb[i]);
	double rs = rel_err(got, ref, (size_t)T * D);
	print_message("silu_mul: rel err %.3g (bf16 out)\n", rs);
	assert_true(rs < 5e-3);
	cudaFree(dx);
	cudaFree(dy);
	cudaFree(dw);
	cudaFree(dof);
	cudaFree(dob);
	free(x);
	free(y);
	free(w);
	free(ref);
	free(got);
	free(gb);
}

static void check_route(ds_config *c, int T, int fused)
{
	ds_err e = { { 0 } };
	const int E = c->n_routed_experts, K = c->num_experts_per_tok;
	float *lg = malloc(4 * (size_t)T * E), *bias = malloc(4 * (size_t)E), *tmp = malloc(4 * (size_t)E);
	for (int i = 0; i < T * E; i++)
		lg[i] = frand() * 3;
	for (int i = 0; i < E; i++)
		bias[i] = frand() * 0.1f;
	float *dl = dup_up(lg, 4 * (size_t)T * E), *db = dup_up(bias, 4 * (size_t)E), *dw = dup_up(NULL, 4 * (size_t)T * K);
	int32_t *di = dup_up(NULL, 4 * (size_t)T * K);
	dsk_route_cfg rc = { .E = E, .K = K, .n_group = c->n_group, .topk_group = c->topk_group,
			     .sigmoid = c->scoring_func == DS_SCORE_SIGMOID, .method = (int)c->topk_method,
			     .norm_topk = c->norm_topk_prob, .scale = c->routed_scaling_factor };
	const int has_bias = c->topk_method == DS_TOPK_NOAUX_TC;
	const int D = 64, P = T * K + 15 * E;
	int32_t *dcnt = dup_up(NULL, 4 * (size_t)E), *doff = dup_up(NULL, 4 * (size_t)(E + 1)), *dpos = dup_up(NULL, 4 * (size_t)T * K);
	int32_t *drt = dup_up(NULL, 4 * (size_t)P);
	int32_t *dact = dup_up(NULL, 4 * (size_t)(E + 1));
	if (fused) {
		/* routing and plan in one launch (up to 32 tokens) */
		assert_int_equal(dsk_moe_route_plan(&rc, dl, has_bias ? db : NULL, T, di, dw, dcnt, doff, dpos, drt, dact,
						    NULL, P, NULL, &e), 0);
	} else {
		assert_int_equal(dsk_moe_route(&rc, dl, has_bias ? db : NULL, T, di, dw, NULL, &e), 0);
		assert_int_equal(dsk_moe_plan(di, T, K, E, dcnt, doff, dpos, drt, dact, NULL, P, NULL, &e), 0);
	}
	int32_t *ids = malloc(4 * (size_t)T * K), rid[64];
	float *w = malloc(4 * (size_t)T * K), rw[64];
	down(ids, di, 4 * (size_t)T * K);
	down(w, dw, 4 * (size_t)T * K);
	for (int t = 0; t < T; t++) {
		memcpy(tmp, lg + (size_t)t * E, 4 * (size_t)E);
		ds_cpu_route(c, tmp, has_bias ? bias : NULL, rid, rw);
		for (int k = 0; k < K; k++) {
			if (ids[t * K + k] != rid[k])
				fail_msg("route token %d slot %d: expert %d, reference %d", t, k, ids[t * K + k], rid[k]);
			if (fabsf(w[t * K + k] - rw[k]) > 1e-5f * (1 + fabsf(rw[k])))
				fail_msg("route token %d slot %d: weight %g, reference %g", t, k, w[t * K + k], rw[k]);
		}
	}

	/* Permutation and combine: out[t] = sum_k w * yp[pos] with yp[r] = r-th row. */
	int32_t *act = malloc(4 * (size_t)(E + 1)), *cnt = malloc(4 * (size_t)E);
	down(act, dact, 4 * (size_t)(E + 1));
	down(cnt, dcnt, 4 * (size_t)E);
	for (int x = 0, na = 0; x < E; x++)
		if (cnt[x]) {
			assert_true(na < act[0]);
			assert_int_equal(act[1 + na++], x);
		}
	cudaFree(dact);
	free(act);
	free(cnt);
	int32_t *off = malloc(4 * (size_t)(E + 1)), *pos = malloc(4 * (size_t)T * K), *rt = malloc(4 * (size_t)P);
	down(off, doff, 4 * (size_t)(E + 1));
	down(pos, dpos, 4 * (size_t)T * K);
	down(rt, drt, 4 * (size_t)P);
	for (int i = 0; i < T * K; i++) {
		const int x = ids[i];
		assert_true(pos[i] >= off[x] && pos[i] < off[x + 1]);
		assert_int_equal(rt[pos[i]], i / K);
	}
	float *yp = malloc(4 * (size_t)P * D), *ref = calloc((size_t)T * D, 4), *got = malloc(4 * (size_t)T * D);
	for (int i = 0; i < P * D; i++)
		yp[i] = frand();
	for (int t = 0; t < T; t++)
		for (int k = 0; k < K; k++)
			for (int d = 0; d < D; d++)
				ref[t * D + d] += w[t * K + k] * yp[(size_t)pos[t * K + k] * D + d];
	float *dyp = dup_up(yp, 4 * (size_t)P * D), *dout = dup_up(NULL, 4 * (size_t)T * D);
	assert_int_equal(dsk_moe_combine(dout, NULL, dyp, dpos, dw, T, K, D, NULL, &e), 0);
	down(got, dout, 4 * (size_t)T * D);
	double r = rel_err(got, ref, (size_t)T * D);
	{
		/* combine, residual add and norm in one launch: the bits of the two */
		float *x0 = malloc(4 * (size_t)T * D), *nw = malloc(4 * (size_t)D), *sh = malloc(4 * (size_t)T * D);
		for (int i = 0; i < T * D; i++) {
			x0[i] = frand();
			sh[i] = frand();
		}
		for (int i = 0; i < D; i++)
			nw[i] = 1 + 0.1f * frand();
		float *dx1 = dup_up(x0, 4 * (size_t)T * D), *dx2 = dup_up(x0, 4 * (size_t)T * D), *dnw = dup_up(nw, 4 * (size_t)D);
		float *dsh = dup_up(sh, 4 * (size_t)T * D), *dy = dup_up(NULL, 4 * (size_t)T * D);
		float *of1 = dup_up(NULL, 4 * (size_t)T * D), *of2 = dup_up(NULL, 4 * (size_t)T * D);
		dsk_bf16 *ob1 = dup_up(NULL, 2 * (size_t)T * D), *ob2 = dup_up(NULL, 2 * (size_t)T * D);
		assert_int_equal(dsk_moe_combine(dy, dsh, dyp, dpos, dw, T, K, D, NULL, &e), 0);
		assert_int_equal(dsk_add_rmsnorm(dx1, dy, dnw, T, D, 1e-6f, ob1, D, of1, NULL, NULL, &e), 0);
		assert_int_equal(dsk_combine_add_rmsnorm(dx2, dsh, dyp, dpos, dw, K, dnw, T, D, 1e-6f, ob2, D, of2, NULL, NULL, &e), 0);
		dev_equal(dx1, dx2, 4 * (size_t)T * D);
		dev_equal(of1, of2, 4 * (size_t)T * D);
		dev_equal(ob1, ob2, 2 * (size_t)T * D);
		void *dev[] = { dx1, dx2, dnw, dsh, dy, of1, of2, ob1, ob2 };
		FREE_ALL(dev);
		free(x0);
		free(nw);
		free(sh);
	}
	print_message("moe route%s (E=%d K=%d groups %d/%d): %d tokens identical; combine rel err %.3g (fused with the norm: bit-identical)\n",
		      fused ? "+plan in one launch" : "", E, K, c->n_group, c->topk_group, T, r);
	assert_true(r < 1e-6);
	cudaFree(dl);
	cudaFree(db);
	cudaFree(dw);
	cudaFree(di);
	cudaFree(dcnt);
	cudaFree(doff);
	cudaFree(dpos);
	cudaFree(drt);
	cudaFree(dyp);
	cudaFree(dout);
	free(lg);
	free(bias);
	free(tmp);
	free(ids);
	free(w);
	free(off);
	free(pos);
	free(rt);
	free(yp);
	free(ref);
	free(got);
}

/* The norms' FP8 copy (dsk_qout) against dsk_quant_fp8 over their bf16
 * output: the same bytes and scales, plain and fused with the combine, for
 * widths of one group, of fewer groups than warps and of more; then an FP8
 * GEMV reading that copy (dsk_gemm_prequant) equals the one quantizing
 * for itself, and a zeroed copy changes its output (the copy is read). */
static void test_norm_fp8(void **st)
{
	(void)st;
	ds_err e = { { 0 } };
	const int dims[] = { 128, 2048, 7168 }, Ts[] = { 1, 2, 5 };
	for (int di = 0; di < 3; di++)
		for (int ti = 0; ti < 3; ti++) {
			const int D = dims[di], T = Ts[ti], Tp = dsk_gemm_pad(T), G = D / 128, K = 2;
			const size_t n = (size_t)T * D;
			float *x = malloc(4 * n), *y = malloc(4 * n), *w = malloc(4 * (size_t)D), *wk = malloc(4 * (size_t)T * K);
			int32_t *pos = malloc(4 * (size_t)T * K);
			for (size_t i = 0; i < n; i++) {
				x[i] = frand() * 4;
				y[i] = frand() * (i % 97 == 0 ? 50 : 1); /* outliers set some groups' scales */
			}
			for (int i = 0; i < D; i++)
				w[i] = 1 + frand() * 0.2f;
			for (int i = 0; i < T * K; i++) {
				wk[i] = frand();
				pos[i] = (i * 7) % T;
			}
			float *dw = dup_up(w, 4 * (size_t)D), *dy = dup_up(y, 4 * n), *dwk = dup_up(wk, 4 * (size_t)T * K);
			int32_t *dpos = dup_up(pos, 4 * (size_t)T * K);
			for (int fused = 0; fused < 2; fused++) {
				float *dx1 = dup_up(x, 4 * n), *dx2 = dup_up(x, 4 * n);
				dsk_bf16 *ob1 = dup_up(NULL, 2 * (size_t)Tp * D), *ob2 = dup_up(NULL, 2 * (size_t)Tp * D);
				assert_int_equal(cudaMemset(ob1, 0, 2 * (size_t)Tp * D), cudaSuccess);
				uint8_t *q1 = dup_up(NULL, (size_t)Tp * D), *q2 = dup_up(NULL, (size_t)Tp * D);
				float *s1 = dup_up(NULL, 4 * (size_t)G * Tp), *s2 = dup_up(NULL, 4 * (size_t)G * Tp);
				const dsk_qout qo = { q2, s2, Tp };
				if (fused) {
					assert_int_equal(dsk_combine_add_rmsnorm(dx1, NULL, dy, dpos, dwk, K, dw, T, D, 1e-6f, ob1,
										 D, NULL, NULL, NULL, &e), 0);
					assert_int_equal(dsk_combine_add_rmsnorm(dx2, NULL, dy, dpos, dwk, K, dw, T, D, 1e-6f, ob2,
										 D, NULL, &qo, NULL, &e), 0);
				} else {
					assert_int_equal(dsk_add_rmsnorm(dx1, dy, dw, T, D, 1e-6f, ob1, D, NULL, NULL, NULL, &e), 0);
					assert_int_equal(dsk_add_rmsnorm(dx2, dy, dw, T, D, 1e-6f, ob2, D, NULL, &qo, NULL, &e), 0);
				}
				assert_int_equal(dsk_quant_fp8(q1, s1, ob1, Tp, D, NULL, &e), 0);
				dev_equal(ob1, ob2, 2 * n);
				dev_equal(q1, q2, n);
				for (int g = 0; g < G; g++) /* rows t < T of each group's scales */
					dev_equal(s1 + (size_t)g * Tp, s2 + (size_t)g * Tp, 4 * (size_t)T);
				if (fused == 0 && T <= DSK_GEMV_MAX_M) {
					/* An FP8 GEMV and a gate+up pair over ob2 with and without the copy. */
					const int N = 256, sr = N / 128, sld = (G + 3) & ~3;
					uint8_t *wh = malloc((size_t)N * D);
					float *sh = calloc((size_t)sr * G, 4), *shp = calloc((size_t)sr * sld, 4);
					rand_host_weight(1, N, D, wh, sh, shp);
					void *dwt = dup_up(wh, (size_t)N * D);
					float *dsc = dup_up(shp, 4 * (size_t)sr * sld), *o1 = dup_up(NULL, 4 * (size_t)Tp * N);
					float *o2 = dup_up(NULL, 4 * (size_t)Tp * N);
					dsk_bf16 *h1 = dup_up(NULL, 2 * (size_t)Tp * N), *h2 = dup_up(NULL, 2 * (size_t)Tp * N);
					const dsk_weight W = { .type = DSK_W_FP8, .rows = N, .cols = D, .w = dwt, .scale = dsc, .sld = sld };
					dsk_gemm *gm;
					assert_int_equal(dsk_gemm_create(NULL, &gm, &e), 0);
					assert_int_equal(dsk_gemm_run(gm, o1, N, ob2, T, &W, &e), 0);
					assert_int_equal(dsk_gemm_glu(gm, h1, N, ob2, T, &W, &W, &e), 0);
					dsk_gemm_prequant(gm, ob2, T, q2, s2);
					assert_int_equal(dsk_gemm_run(gm, o2, N, ob2, T, &W, &e), 0);
					assert_int_equal(dsk_gemm_glu(gm, h2, N, ob2, T, &W, &W, &e), 0);
					dev_equal(o1, o2, 4 * (size_t)T * N);
					dev_equal(h1, h2, 2 * (size_t)T * N);
					float *gb = malloc(4 * (size_t)T * N);
					/* mutation: the registered copy zeroed -> all-zero output */
					assert_int_equal(cudaMemset(q2, 0, (size_t)Tp * D), cudaSuccess);
					assert_int_equal(dsk_gemm_run(gm, o2, N, ob2, T, &W, &e), 0);
					down(gb, o2, 4 * (size_t)T * N);
					for (int i = 0; i < T * N; i++)
						assert_true(gb[i] == 0.0f);
					/* forgotten: quantizes ob2 itself again */
					dsk_gemm_prequant(gm, NULL, 0, NULL, NULL);
					assert_int_equal(dsk_gemm_run(gm, o2, N, ob2, T, &W, &e), 0);
					dev_equal(o1, o2, 4 * (size_t)T * N);
					dsk_gemm_free(gm);
					void *dev[] = { dwt, dsc, o1, o2, h1, h2 };
					FREE_ALL(dev);
					free(wh);
					free(sh);
					free(shp);
					free(gb);
				}
				void *dev[] = { dx1, dx2, ob1, ob2, q1, q2, s1, s2 };
				FREE_ALL(dev);
			}
			void *dev[] = { dw, dy, dwk, dpos };
			FREE_ALL(dev);
			free(x);
			free(y);
			free(w);
			free(wk);
			free(pos);
		}
	assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
	dsk_bf16 *ob = dup_up(NULL, 2 * 100);
	float *x1 = dup_up(NULL, 4 * 100);
	const dsk_qout bad = { (uint8_t *)ob, x1, 1 };
	assert_int_equal(dsk_add_rmsnorm(x1, NULL, x1, 1, 100, 1e-6f, ob, 100, NULL, &bad, NULL, &e), -EINVAL);
	cudaFree(ob);
	cudaFree(x1);
	print_message("norm fp8 copy: bytes and scales of dsk_quant_fp8 at widths 128/2048/7168, 1-5 rows, plain and "
		      "fused; GEMV and gate+up over it bit-identical\n");
}

static void test_route(void **st)
{
	(void)st;
	ds_config v3 = { .n_routed_experts = 256, .num_experts_per_tok = 8, .n_group = 8, .topk_group = 4,
			 .scoring_func = DS_SCORE_SIGMOID, .topk_method = DS_TOPK_NOAUX_TC, .norm_topk_prob = 1,
			 .routed_scaling_factor = 2.5f };
	check_route(&v3, 200, 0);
	check_route(&v3, 1, 1);
	check_route(&v3, 32, 1);
	ds_config v2 = { .n_routed_experts = 64, .num_experts_per_tok = 6, .n_group = 1, .topk_group = 1,
			 .scoring_func = DS_SCORE_SOFTMAX, .topk_method = DS_TOPK_GREEDY, .norm_topk_prob = 0,
			 .routed_scaling_factor = 1.0f };
	check_route(&v2, 77, 0);
	check_route(&v2, 8, 1);
	ds_config v25 = v2;
	v25.n_group = 8;
	v25.topk_group = 3;
	v25.topk_method = DS_TOPK_GROUP_LIMITED;
	check_route(&v25, 50, 0);
	check_route(&v25, 3, 1);
}

/* Paged cache of two sequences; queries at assorted positions. */
static void check_attention(int nh, int kvl, int rope, int bt, int nsplit)
{
	ds_err e = { { 0 } };
	const int kvd = kvl + rope, nope = 16, qk = nope + rope, L = 2, layer = 1, nblocks = 40;
	int32_t tables[2][20];
	for (int s = 0, nb = 0; s < 2; s++)
		for (int i = 0; i < 20; i++)
			tables[s][i] = (nb++ * 7) % nblocks; /* scattered */
	const size_t pool_n = (size_t)nblocks * L * bt * kvd;
	uint16_t *pool = malloc(2 * pool_n);
	for (size_t i = 0; i < pool_n; i++)
		pool[i] = ds_f32_to_bf16(frand());
	const int T = 6;
	int32_t seq[6] = { 0, 0, 0, 1, 1, 0 }, pos[6] = { 0, 150, 299, 5, 76, 17 };
	float *q = malloc(4 * (size_t)T * nh * qk), *qabs = malloc(4 * (size_t)T * nh * kvl);
	for (int i = 0; i < T * nh * qk; i++)
		q[i] = frand();
	for (int i = 0; i < T * nh * kvl; i++)
		qabs[i] = frand() * 0.3f;
	const float scale = 0.2f;
	float *ref = malloc(4 * (size_t)T * nh * kvl), *got = malloc(4 * (size_t)T * nh * kvl);
	for (int t = 0; t < T; t++)
		for (int h = 0; h < nh; h++) {
			const int n = pos[t] + 1;
			double *sc = malloc(sizeof(double) * n), mx = -INFINITY, sum = 0;
			for (int j = 0; j < n; j++) {
				const uint16_t *c = pool + ((size_t)tables[seq[t]][j / bt] * L + layer) * bt * kvd + (size_t)(j % bt) * kvd;
				double d = 0;
				for (int i = 0; i < kvl; i++)
					d += (double)qabs[((size_t)t * nh + h) * kvl + i] * ds_bf16_to_f32(c[i]);
				for (int i = 0; i < rope; i++)
					d += (double)q[((size_t)t * nh + h) * qk + nope + i] * ds_bf16_to_f32(c[kvl + i]);
				sc[j] = d * scale;
				mx = fmax(mx, sc[j]);
			}
			for (int j = 0; j < n; j++)
				sum += (sc[j] = exp(sc[j] - mx));
			for (int i = 0; i < kvl; i++) {
				double a = 0;
				for (int j = 0; j < n; j++) {
					const uint16_t *c = pool + ((size_t)tables[seq[t]][j / bt] * L + layer) * bt * kvd + (size_t)(j % bt) * kvd;
					a += sc[j] * ds_bf16_to_f32(c[i]);
				}
				ref[((size_t)t * nh + h) * kvl + i] = (float)(a / sum);
			}
			free(sc);
		}
	void *dpool = dup_up(pool, 2 * pool_n);
	int32_t *dtab = dup_up(tables, sizeof(tables)), *dseq = dup_up(seq, sizeof(seq)), *dpos = dup_up(pos, sizeof(pos));
	float *dq = dup_up(q, 4 * (size_t)T * nh * qk), *dqa = dup_up(qabs, 4 * (size_t)T * nh * kvl);
	float *dws = dup_up(NULL, 4 * dsk_attn_ws_floats(T, nh, kvl, nsplit));
	uint16_t *dlat = dup_up(NULL, 2 * (size_t)T * nh * kvl);
	dsk_attn_args a = { .g = { .pool = dpool, .block_stride = (long)L * bt * kvd, .layer_stride = (long)bt * kvd,
				   .block_tokens = bt, .tables = dtab, .max_blocks = 20 },
			    .layer = layer, .q = dq, .qabs = dqa, .nh = nh, .nope = nope, .rope = rope, .kvl = kvl,
			    .seq = dseq, .pos = dpos, .T = T, .max_len = 300, .scale = scale, .ws = dws,
			    .lat = (dsk_bf16 *)dlat };
	int rc = dsk_mla_attention(&a, nsplit, NULL, &e);
	if (rc)
		fail_msg("attention: %s", e.msg);
	uint16_t *lb = malloc(2 * (size_t)T * nh * kvl);
	down(lb, dlat, 2 * (size_t)T * nh * kvl);
	for (int i = 0; i < T * nh * kvl; i++)
		got[i] = ds_bf16_to_f32(lb[i]);
	double r = rel_err(got, ref, (size_t)T * nh * kvl);
	print_message("mla attention nh=%d kvl=%d rope=%d block %d, %d splits: rel err %.3g\n", nh, kvl, rope, bt, nsplit, r);
	assert_true(r < 5e-3);
	cudaFree(dpool);
	cudaFree(dtab);
	cudaFree(dseq);
	cudaFree(dpos);
	cudaFree(dq);
	cudaFree(dqa);
	cudaFree(dws);
	cudaFree(dlat);
	free(pool);
	free(q);
	free(qabs);
	free(ref);
	free(got);
	free(lb);
}

static void test_attention(void **st)
{
	(void)st;
	check_attention(16, 512, 64, 16, 1);
	check_attention(16, 512, 64, 64, 5);
	check_attention(12, 128, 32, 16, 3);
	check_attention(16, 512, 64, 16, 24); /* 144 blocks: the 4-warp kernel (fewer than the SMs take 8) */
}


/* A random device weight [N][K] (rand_host_weight's values). */
static dsk_weight rand_weight(int fp8, int N, int K)
{
	const int sr = (N + 127) / 128, sc = (K + 127) / 128, sld = (sc + 3) & ~3;
	const size_t nb = (size_t)N * K * (fp8 ? 1 : 2);
	void *wh = malloc(nb);
	float *sh = calloc((size_t)sr * sc, 4), *shp = calloc((size_t)sr * sld, 4);
	rand_host_weight(fp8, N, K, wh, sh, shp);
	dsk_weight w = { .type = fp8 ? DSK_W_FP8 : DSK_W_BF16, .rows = N, .cols = K, .w = dup_up(wh, nb),
			 .scale = fp8 ? dup_up(shp, 4 * (size_t)sr * sld) : NULL, .sld = sld };
	free(wh);
	free(sh);
	free(shp);
	return w;
}

static void free_weight(dsk_weight *w)
{
	cudaFree((void *)w->w);
	cudaFree((void *)w->scale);
}

/* Two projections in one launch compute the bits of the separate GEMVs
 * they replace, and so does gate+up+SiLU in one launch (against two GEMVs
 * and dsk_silu_mul) at 1-2 rows; at 3-16 rows it is within a bf16 step. On
 * the tensor-core GEMV (3-16 rows) a token's result does not depend on the
 * others: the first 3 rows of every such launch equal the 3-row launch's. */
static void test_gemv_fused(void **st)
{
	(void)st;
	ds_err e = { { 0 } };
	dsk_gemm *g;
	assert_int_equal(dsk_gemm_create(NULL, &g, &e), 0);
	const int Ms[] = { 1, 2, 3, 5, 8, 9, 16, 17 }; /* 17: cuBLASLt, both projections on one quantization */
	for (int fp8 = 0; fp8 <= 1; fp8++) {
		float *first = NULL; /* the 3-row launch's o0 */
		for (size_t mi = 0; mi < sizeof(Ms) / sizeof(Ms[0]); mi++) {
			const int M = Ms[mi], tc = M > 2 && M <= DSK_GEMV_MAX_M;
			const int K = 1024, N0 = 576, N1 = 208, I = 384, Mp = dsk_gemm_pad(M);
			uint16_t *xh = calloc((size_t)Mp * K, 2);
			const unsigned keep = test_rng;
			test_rng = 777; /* the same rows first at every M */
			for (int i = 0; i < M * K; i++)
				xh[i] = ds_f32_to_bf16(frand());
			dsk_bf16 *dx = dup_up(xh, 2 * (size_t)Mp * K);
			test_rng = 12345; /* and the same weights */
			dsk_weight w0 = rand_weight(fp8, N0, K), w1 = rand_weight(fp8, N1, K);
			dsk_weight wg = rand_weight(fp8, I, K), wu = rand_weight(fp8, I, K);
			test_rng = keep;
			float *o0 = dup_up(NULL, 4 * (size_t)Mp * N0), *o1 = dup_up(NULL, 4 * (size_t)Mp * N1);
			float *r0 = dup_up(NULL, 4 * (size_t)Mp * N0), *r1 = dup_up(NULL, 4 * (size_t)Mp * N1);
			float *gb = dup_up(NULL, 4 * (size_t)Mp * I), *ub = dup_up(NULL, 4 * (size_t)Mp * I);
			dsk_bf16 *h = dup_up(NULL, 2 * (size_t)Mp * I), *hr = dup_up(NULL, 2 * (size_t)Mp * I);
			assert_int_equal(dsk_gemm_run2(g, o0, N0, &w0, o1, N1, &w1, dx, M, &e), 0);
			assert_int_equal(dsk_gemm_run(g, r0, N0, dx, M, &w0, &e), 0);
			assert_int_equal(dsk_gemm_run(g, r1, N1, dx, M, &w1, &e), 0);
			assert_int_equal(dsk_gemm_glu(g, h, I, dx, M, &wg, &wu, &e), M <= DSK_GEMV_MAX_M ? 0 : -ENOTSUP);
			assert_int_equal(dsk_gemm_run(g, gb, I, dx, M, &wg, &e), 0);
			assert_int_equal(dsk_gemm_run(g, ub, I, dx, M, &wu, &e), 0);
			assert_int_equal(dsk_silu_mul(hr, gb, ub, M, I, NULL, &e), 0);
			assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
			dev_equal(o0, r0, 4 * (size_t)M * N0);
			dev_equal(o1, r1, 4 * (size_t)M * N1);
			if (M <= 2) {
				dev_equal(h, hr, 2 * (size_t)M * I);
			} else if (tc) {
				/* the fused launch splits K in other chunks (half the
				 * loads a row, two rows): its float sums may round
				 * apart, so h within one bf16 step of the separate one */
				uint16_t *a16 = malloc(2 * (size_t)M * I), *b16 = malloc(2 * (size_t)M * I);
				down(a16, h, 2 * (size_t)M * I);
				down(b16, hr, 2 * (size_t)M * I);
				int worst = 0;
				for (int i = 0; i < M * I; i++) {
					const float x = ds_bf16_to_f32(a16[i]), y = ds_bf16_to_f32(b16[i]);
					const int d = fabsf(x - y) <= fabsf(y) * (1.0f / 128) + 1e-6f ? 0 : 1;
					worst |= d;
				}
				assert_int_equal(worst, 0);
				free(a16);
				free(b16);
			}
			if (M == 3) {
				first = malloc(4 * (size_t)3 * N0);
				down(first, o0, 4 * (size_t)3 * N0);
			} else if (tc) {
				float *o = malloc(4 * (size_t)3 * N0);
				down(o, o0, 4 * (size_t)3 * N0);
				assert_memory_equal(o, first, 4 * (size_t)3 * N0);
				free(o);
			}
			/* and the fused launch is not a copy of zeros */
			float *a = malloc(4 * (size_t)M * I);
			down(a, gb, 4 * (size_t)M * I);
			double ss = 0;
			for (int i = 0; i < M * I; i++)
				ss += (double)a[i] * a[i];
			assert_true(ss > 0);
			print_message("%s %s M=%d: two projections%s in one launch: bit-identical%s%s\n",
				      M <= 2 ? "gemv" : tc ? "tensor-core gemv" : "cublasLt", fp8 ? "fp8" : "bf16", M,
				      M <= 2 ? " and gate+up+SiLU" : "", tc ? "; gate+up+SiLU within a bf16 step" : "",
				      tc && M > 3 ? "; rows 0-2 = M=3's" : "");
			free(a);
			free_weight(&w0);
			free_weight(&w1);
			free_weight(&wg);
			free_weight(&wu);
			cudaFree(dx);
			cudaFree(o0);
			cudaFree(o1);
			cudaFree(r0);
			cudaFree(r1);
			cudaFree(gb);
			cudaFree(ub);
			cudaFree(h);
			cudaFree(hr);
			free(xh);
		}
		free(first);
	}
	/* more rows than the GEMV takes: the caller's fallback */
	assert_int_equal(dsk_gemm_glu(g, NULL, 384, NULL, DSK_GEMV_MAX_M + 1, &(dsk_weight){ .type = DSK_W_BF16, .rows = 384, .cols = 1024 },
				      &(dsk_weight){ .type = DSK_W_BF16, .rows = 384, .cols = 1024 }, &e),
			 -ENOTSUP);
	dsk_gemm_free(g);
}

/* The routed experts' GEMV with more than 2 rows a pass (tensor cores)
 * against the 1-2-row kernel (CUDA cores, more passes) on the same plan:
 * gate+up+SiLU with gathered rows, then down over the plan's rows, bf16 and
 * FP8, experts of 1-4 rows and of ~24 (several 16-token tiles); in bf16
 * also the bulk-copy kernel (dsk_moe_gemv_bulk), bit for bit the 1-2-row
 * one's. */
static void check_moe_gemv(int fp8, int T, int E, int K, int H, int I)
{
	ds_err e = { { 0 } };
	const int P = T * K + 15 * E, Tp = dsk_gemm_pad(T);
	int32_t *ids = malloc(4 * (size_t)T * K);
	for (int t = 0; t < T; t++)
		for (int k = 0; k < K; k++) {
			int x, dup;
			do {
				test_rng = test_rng * 1664525u + 1013904223u;
				x = (int)((test_rng >> 8) % (unsigned)E);
				dup = 0;
				for (int j = 0; j < k; j++)
					dup |= ids[t * K + j] == x;
			} while (dup);
			ids[t * K + k] = x;
		}
	int32_t *di = dup_up(ids, 4 * (size_t)T * K), *dcnt = dup_up(NULL, 4 * (size_t)E);
	int32_t *doff = dup_up(NULL, 4 * (size_t)(E + 1)), *dpos = dup_up(NULL, 4 * (size_t)T * K);
	int32_t *drt = dup_up(NULL, 4 * (size_t)P), *dact = dup_up(NULL, 4 * (size_t)(E + 1));
	assert_int_equal(dsk_moe_plan(di, T, K, E, dcnt, doff, dpos, drt, dact, NULL, P, NULL, &e), 0);
	uint16_t *xh = calloc((size_t)Tp * H, 2);
	for (int i = 0; i < T * H; i++)
		xh[i] = ds_f32_to_bf16(frand());
	dsk_bf16 *dx = dup_up(xh, 2 * (size_t)Tp * H);
	dsk_weight *w = malloc(sizeof(dsk_weight) * 3 * (size_t)E);
	const void **hp[3];
	const float **hs[3];
	for (int j = 0; j < 3; j++) {
		hp[j] = malloc(sizeof(void *) * (size_t)E);
		hs[j] = malloc(sizeof(float *) * (size_t)E);
		for (int x = 0; x < E; x++) {
			w[j * E + x] = j < 2 ? rand_weight(fp8, I, H) : rand_weight(fp8, H, I);
			hp[j][x] = w[j * E + x].w;
			hs[j][x] = w[j * E + x].scale;
		}
	}
	const void **dp[3];
	const float **ds[3];
	for (int j = 0; j < 3; j++) {
		dp[j] = dup_up(hp[j], sizeof(void *) * (size_t)E);
		ds[j] = dup_up(hs[j], sizeof(float *) * (size_t)E);
	}
	uint8_t *qx = dup_up(NULL, (size_t)P * (H > I ? H : I));
	float *qs = dup_up(NULL, 4 * (size_t)P * ((H > I ? H : I) / 128 + 1));
	if (fp8)
		assert_int_equal(dsk_quant_fp8(qx, qs, dx, Tp, H, NULL, &e), 0);
	dsk_bf16 *h[3];
	float *y[3];
	for (int v = 0; v < 3; v++) {
		h[v] = dup_up(NULL, 2 * (size_t)P * I);
		y[v] = dup_up(NULL, 4 * (size_t)P * H);
		assert_int_equal(cudaMemset(h[v], 0, 2 * (size_t)P * I), cudaSuccess);
		assert_int_equal(cudaMemset(y[v], 0, 4 * (size_t)P * H), cudaSuccess);
	}
	uint8_t *qh = dup_up(NULL, (size_t)P * I);
	float *qhs = dup_up(NULL, 4 * (size_t)P * (I / 128 + 1));
	const int max_act = T * K < E ? T * K : E;
	/* v 0: max_rows 2 on the register kernel (reference), 1: tensor cores,
	 * 2: max_rows 2 in bulk copies (bf16) */
	for (int v = 0; v < (fp8 ? 2 : 3); v++) {
		const int mr = v == 1 ? (T < 16 ? T : 16) : 2;
		dsk_moe_gemv_args g = { .out = h[v], .ldo = I, .x = fp8 ? (const void *)qx : dx, .xs = qs, .xs_ld = Tp,
					.row_src = drt, .off = doff, .cnt = dcnt, .act = dact, .max_active = max_act,
					.max_rows = mr, .wp = { dp[0], dp[1] }, .sp = { ds[0], ds[1] },
					.sld = w[0].sld, .fp8 = fp8, .glu = 1, .N = I, .K = H, .no_bulk = v == 0 };
		if (v == 2)
			assert_int_equal(dsk_moe_gemv_bulk(&g, NULL, &e), 0);
		else
			assert_int_equal(dsk_moe_gemv(&g, NULL, &e), 0);
		/* the down projection reads the reference's h in both runs */
		g.out = y[v];
		g.ldo = H;
		g.x = h[0];
		g.row_src = NULL;
		g.wp[0] = dp[2];
		g.sp[0] = ds[2];
		g.sld = w[2 * E].sld;
		g.glu = 0;
		g.N = H;
		g.K = I;
		if (fp8) {
			assert_int_equal(dsk_quant_fp8(qh, qhs, h[0], P, I, NULL, &e), 0);
			g.x = qh;
			g.xs = qhs;
			g.xs_ld = P;
		}
		if (v == 2)
			assert_int_equal(dsk_moe_gemv_bulk(&g, NULL, &e), 0);
		else
			assert_int_equal(dsk_moe_gemv(&g, NULL, &e), 0);
	}
	assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
	if (!fp8) {
		dev_equal(h[0], h[2], 2 * (size_t)P * I);
		dev_equal(y[0], y[2], 4 * (size_t)P * H);
	}
	float *a = malloc(4 * (size_t)P * H), *b = malloc(4 * (size_t)P * H);
	uint16_t *ha = malloc(2 * (size_t)P * I), *hb = malloc(2 * (size_t)P * I);
	down(ha, h[0], 2 * (size_t)P * I);
	down(hb, h[1], 2 * (size_t)P * I);
	float *fa = malloc(4 * (size_t)P * I), *fb = malloc(4 * (size_t)P * I);
	double ss = 0;
	for (size_t i = 0; i < (size_t)P * I; i++) {
		fa[i] = ds_bf16_to_f32(ha[i]);
		fb[i] = ds_bf16_to_f32(hb[i]);
		ss += (double)fa[i] * fa[i];
	}
	const double rh = rel_err(fb, fa, (size_t)P * I);
	down(a, y[0], 4 * (size_t)P * H);
	down(b, y[1], 4 * (size_t)P * H);
	const double ry = rel_err(b, a, (size_t)P * H);
	print_message("moe gemv %s T=%d E=%d K=%d: tensor cores vs 2-row passes: gate+up+SiLU rel err %.3g, down %.3g\n",
		      fp8 ? "fp8" : "bf16", T, E, K, rh, ry);
	assert_true(ss > 0);
	assert_true(rh < 5e-3); /* bf16 outputs: a rounding apart at most */
	assert_true(ry < 1e-5);
	for (int j = 0; j < 3; j++) {
		for (int x = 0; x < E; x++)
			free_weight(&w[j * E + x]);
		cudaFree(dp[j]);
		cudaFree(ds[j]);
		free(hp[j]);
		free(hs[j]);
	}
	void *dev[] = { di, dcnt, doff, dpos, drt, dact, dx, qx, qs, h[0], h[1], h[2], y[0], y[1], y[2], qh, qhs };
	FREE_ALL(dev);
	free(w);
	free(ids);
	free(xh);
	free(a);
	free(b);
	free(ha);
	free(hb);
	free(fa);
	free(fb);
}

static void test_moe_gemv(void **st)
{
	(void)st;
	for (int fp8 = 0; fp8 <= 1; fp8++) {
		check_moe_gemv(fp8, 16, 64, 6, 256, 384);
		check_moe_gemv(fp8, 64, 16, 6, 512, 256);
	}
	check_moe_gemv(0, 2, 16, 6, 2048, 1408); /* V2-Lite's expert rows: the bulk kernel's ring wraps */
}

/* The per-head GEMV (MLA's W_UV for 1-2 tokens) against a float64 loop:
 * bf16 outputs, so within a rounding; more tokens are the caller's GEMM. */
static void test_gemv_heads(void **st)
{
	(void)st;
	ds_err e = { { 0 } };
	const int shapes[][3] = { { 16, 128, 512 }, { 3, 20, 128 }, { 5, 24, 1032 } }; /* nh, rows, K */
	for (size_t c = 0; c < sizeof(shapes) / sizeof(shapes[0]); c++)
		for (int T = 1; T <= 2; T++) {
			const int nh = shapes[c][0], rows = shapes[c][1], K = shapes[c][2], pad = 40;
			const long ws = (long)(rows + pad) * K; /* heads interleaved with other rows, as in kv_b */
			uint16_t *w = malloc(2 * (size_t)nh * ws), *x = malloc(2 * (size_t)T * nh * K);
			for (size_t i = 0; i < (size_t)nh * ws; i++)
				w[i] = ds_f32_to_bf16(frand());
			for (int i = 0; i < T * nh * K; i++)
				x[i] = ds_f32_to_bf16(frand());
			dsk_bf16 *dw = dup_up(w, 2 * (size_t)nh * ws), *dx = dup_up(x, 2 * (size_t)T * nh * K);
			dsk_bf16 *dout = dup_up(NULL, 2 * (size_t)T * nh * rows);
			assert_int_equal(dsk_gemv_heads(dout, dw + (size_t)pad * K, ws, dx, T, nh, rows, K, NULL, &e), 0);
			uint16_t *o = malloc(2 * (size_t)T * nh * rows);
			down(o, dout, 2 * (size_t)T * nh * rows);
			float *got = malloc(4 * (size_t)T * nh * rows), *ref = malloc(4 * (size_t)T * nh * rows);
			for (int t = 0; t < T; t++)
				for (int h = 0; h < nh; h++)
					for (int i = 0; i < rows; i++) {
						double d = 0;
						for (int k = 0; k < K; k++)
							d += (double)ds_bf16_to_f32(w[h * ws + (size_t)(pad + i) * K + k]) *
							     ds_bf16_to_f32(x[((size_t)t * nh + h) * K + k]);
						const size_t j = ((size_t)t * nh + h) * rows + i;
						ref[j] = (float)d;
						got[j] = ds_bf16_to_f32(o[j]);
					}
			const double r = rel_err(got, ref, (size_t)T * nh * rows);
			print_message("gemv_heads nh=%d rows=%d K=%d T=%d: rel err %.3g (bf16 out)\n", nh, rows, K, T, r);
			assert_true(r < 4e-3);
			assert_int_equal(dsk_gemv_heads(dout, dw, ws, dx, 3, nh, rows, K, NULL, &e), -ENOTSUP);
			cudaFree(dw);
			cudaFree(dx);
			cudaFree(dout);
			free(w);
			free(x);
			free(o);
			free(got);
			free(ref);
		}
}

/* MLA prep with the W_UK absorption in the launch: the cache, q and its bf16
 * copy equal the plain launch's bits; qabs matches a float64 loop. */
static void check_prep(int T, int nh, int nope, int rope, int kvl, int vd)
{
	ds_err e = { { 0 } };
	const int kvd = kvl + rope, qk = nope + rope, bt = 16, nblk = 8, mb = 4;
	float *kv = malloc(4 * (size_t)T * kvd), *q = malloc(4 * (size_t)T * nh * qk), *nw = malloc(4 * (size_t)kvl);
	float *invf = malloc(4 * (size_t)(rope / 2));
	uint16_t *kvb = malloc(2 * (size_t)nh * (nope + vd) * kvl);
	int32_t tables[2 * 4] = { 3, 1, 6, 0, 2, 7, 5, 4 }, seq[8], pos[8];
	for (int i = 0; i < T * kvd; i++)
		kv[i] = frand();
	for (int i = 0; i < T * nh * qk; i++)
		q[i] = frand();
	for (int i = 0; i < kvl; i++)
		nw[i] = 1 + 0.1f * frand();
	for (int i = 0; i < rope / 2; i++)
		invf[i] = powf(10000.0f, -2.0f * i / rope);
	for (size_t i = 0; i < (size_t)nh * (nope + vd) * kvl; i++)
		kvb[i] = ds_f32_to_bf16(frand() / sqrtf((float)nope));
	for (int t = 0; t < T; t++) {
		seq[t] = t % 2;
		pos[t] = 5 + 7 * t;
	}
	const size_t pool_n = (size_t)nblk * bt * kvd;
	dsk_bf16 *pool = dup_up(NULL, 2 * pool_n);
	int32_t *dt = dup_up(tables, sizeof(tables)), *ds = dup_up(seq, 4 * (size_t)T), *dp = dup_up(pos, 4 * (size_t)T);
	float *dkv = dup_up(kv, 4 * (size_t)T * kvd), *dnw = dup_up(nw, 4 * (size_t)kvl), *dinv = dup_up(invf, 2 * (size_t)rope);
	dsk_bf16 *dkvb = dup_up(kvb, 2 * (size_t)nh * (nope + vd) * kvl);
	float *dq = dup_up(q, 4 * (size_t)T * nh * qk), *dqabs = dup_up(NULL, 4 * (size_t)T * nh * kvl);
	dsk_bf16 *dqb = dup_up(NULL, 2 * (size_t)T * nh * qk);
	dsk_kv_geom geo = { .pool = pool, .block_stride = (long)bt * kvd, .layer_stride = (long)bt * kvd,
			    .block_tokens = bt, .tables = dt, .max_blocks = mb };
	const size_t nq = (size_t)T * nh * qk;
	uint16_t *pool1 = malloc(2 * pool_n), *pool2 = malloc(2 * pool_n), *qb1 = malloc(2 * nq), *qb2 = malloc(2 * nq);
	float *q1 = malloc(4 * nq), *q2 = malloc(4 * nq), *qabs = malloc(4 * (size_t)T * nh * kvl);
	cudaMemset(pool, 0, 2 * pool_n);
	assert_int_equal(dsk_mla_prep(&geo, 0, dkv, dnw, 1e-6f, dq, dqb, nh, nope, rope, kvl, dinv, 0.9f, ds, dp, T, NULL,
				      vd, NULL, NULL, &e), 0);
	assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
	down(pool1, pool, 2 * pool_n);
	down(q1, dq, 4 * nq);
	down(qb1, dqb, 2 * nq);
	cudaMemcpy(dq, q, 4 * nq, cudaMemcpyHostToDevice);
	cudaMemset(pool, 0, 2 * pool_n);
	cudaMemset(dqb, 0, 2 * nq);
	assert_int_equal(dsk_mla_prep(&geo, 0, dkv, dnw, 1e-6f, dq, dqb, nh, nope, rope, kvl, dinv, 0.9f, ds, dp, T, dkvb,
				      vd, dqabs, NULL, &e), 0);
	assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
	down(pool2, pool, 2 * pool_n);
	down(q2, dq, 4 * nq);
	down(qb2, dqb, 2 * nq);
	down(qabs, dqabs, 4 * (size_t)T * nh * kvl);
	assert_memory_equal(pool1, pool2, 2 * pool_n);
	assert_memory_equal(q1, q2, 4 * nq);
	assert_memory_equal(qb1, qb2, 2 * nq);
	double num = 0, den = 0;
	for (int t = 0; t < T; t++)
		for (int h = 0; h < nh; h++)
			for (int c = 0; c < kvl; c++) {
				double r = 0;
				for (int d = 0; d < nope; d++)
					r += (double)ds_bf16_to_f32(kvb[((size_t)h * (nope + vd) + d) * kvl + c]) *
					     q[((size_t)t * nh + h) * qk + d];
				const double dd = qabs[((size_t)t * nh + h) * kvl + c] - r;
				num += dd * dd;
				den += r * r;
			}
	const double rel = sqrt(num / den);
	print_message("mla prep + absorption T=%d nh=%d nope=%d kvl=%d: cache and q bit-identical, qabs rel err %.3g\n", T,
		      nh, nope, kvl, rel);
	assert_true(rel < 1e-5);
	/* more tokens than the fused launch takes */
	assert_int_equal(dsk_mla_prep(&geo, 0, dkv, dnw, 1e-6f, dq, dqb, nh, nope, rope, kvl, dinv, 0.9f, ds, dp,
				      DSK_ABSORB_MAX_T + 1, dkvb, vd, dqabs, NULL, &e), -EINVAL);
	void *dev[] = { pool, dt, ds, dp, dkv, dnw, dinv, dkvb, dq, dqabs, dqb };
	FREE_ALL(dev);
	free(kv);
	free(q);
	free(nw);
	free(invf);
	free(kvb);
	free(pool1);
	free(pool2);
	free(qb1);
	free(qb2);
	free(q1);
	free(q2);
	free(qabs);
}

static void test_mla_prep(void **st)
{
	(void)st;
	check_prep(1, 16, 128, 64, 512, 128);
	check_prep(8, 5, 128, 64, 512, 128);
	check_prep(3, 4, 32, 16, 64, 32);
}

/* One row of --bench: dsk_gemm_run at M x N x K (median of 20 after
 * warm-up), FP8 beyond the GEMV also timing the activations' quantization
 * alone ("gemm TF/s" is the throughput without it). */
static void bench_one(dsk_gemm *g, int fp8, int M, int N, int K, int gemv)
{
	ds_err e = { { 0 } };
	dsk_gemm_set_gemv(g, gemv);
	const int sr = (N + 127) / 128, sld = ((K / 128) + 3) & ~3;
	void *dx, *dw, *dout;
	float *ds;
	uint16_t *hx = malloc(2 * (size_t)M * K);
	for (size_t i = 0; i < (size_t)M * K; i++)
		hx[i] = ds_f32_to_bf16(frand());
	cudaMalloc(&dx, 2 * (size_t)dsk_gemm_pad(M) * K);
	cudaMemcpy(dx, hx, 2 * (size_t)M * K, cudaMemcpyHostToDevice);
	cudaMalloc(&dw, (size_t)N * K * (fp8 ? 1 : 2));
	cudaMemset(dw, 0x3a, (size_t)N * K * (fp8 ? 1 : 2));
	cudaMalloc((void **)&ds, 4 * (size_t)sr * sld);
	cudaMemset(ds, 0x3c, 4 * (size_t)sr * sld);
	cudaMalloc(&dout, 4 * (size_t)dsk_gemm_pad(M) * N);
	dsk_weight w = { .type = fp8 ? DSK_W_FP8 : DSK_W_BF16, .rows = N, .cols = K, .w = dw, .scale = ds, .sld = sld };
	double ms[20];
	cudaEvent_t a, b;
	cudaEventCreate(&a);
	cudaEventCreate(&b);
	int rc = 0;
	for (int i = 0; i < 3 && !rc; i++)
		rc = dsk_gemm_run(g, dout, N, dx, M, &w, &e);
	for (int i = 0; i < 20 && !rc; i++) {
		cudaEventRecord(a, NULL);
		rc = dsk_gemm_run(g, dout, N, dx, M, &w, &e);
		cudaEventRecord(b, NULL);
		cudaEventSynchronize(b);
		float t;
		cudaEventElapsedTime(&t, a, b);
		ms[i] = t;
	}
	const int on_gemv = gemv && M <= DSK_GEMV_MAX_M;
	double qmed = 0;
	if (!rc && fp8 && !on_gemv) {
		const int Mp = dsk_gemm_pad(M);
		uint8_t *q;
		float *qs;
		cudaMalloc((void **)&q, (size_t)Mp * K);
		cudaMalloc((void **)&qs, 4 * (size_t)Mp * (K / 128));
		double qt[20];
		for (int i = 0; i < 23 && !rc; i++) {
			cudaEventRecord(a, NULL);
			rc = dsk_quant_fp8(q, qs, dx, Mp, K, NULL, &e);
			cudaEventRecord(b, NULL);
			cudaEventSynchronize(b);
			float t;
			cudaEventElapsedTime(&t, a, b);
			if (i >= 3)
				qt[i - 3] = t;
		}
		qmed = rc ? 0 : median(qt, 20);
		cudaFree(q);
		cudaFree(qs);
	}
	if (rc) {
		printf("%-6s %6d %6d %6d  failed: %s\n", fp8 ? "fp8" : "bf16", M, N, K, e.msg);
	} else {
		const double med = median(ms, 20), gmed = med - qmed;
		printf("%-6s %6d %6d %6d %10.4f %10.1f %10.4f %10.1f %8.0f GB/s %s\n", fp8 ? "fp8" : "bf16", M, N, K, med,
		       2.0 * M * N * K / (med * 1e-3) / 1e12, qmed, 2.0 * M * N * K / (gmed * 1e-3) / 1e12,
		       ((double)N * K * (fp8 ? 1 : 2) + 2.0 * M * K + 4.0 * M * N) / (med * 1e-3) / 1e9,
		       !on_gemv ? "cublasLt" : M <= 2 ? "gemv" : "gemv-tc");
	}
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	cudaFree(dx);
	cudaFree(dw);
	cudaFree(ds);
	cudaFree(dout);
	free(hx);
}

/* --bench: GEMM throughput at DeepSeek-V3 shapes, then decode-sized rows
 * (V3's 7168x2048, V2-Lite's q 3072x2048) through the GEMV and through
 * cuBLASLt in the same process. */
static int bench(void)
{
	ds_err e = { { 0 } };
	const int shapes[][3] = { { 4096, 7168, 2048 }, { 4096, 2048, 7168 }, { 4096, 24576, 1536 }, { 4096, 7168, 16384 },
				  { 4096, 4096, 7168 } };
	const int small_m[] = { 1, 2, 4, 8, 16 }, small_nk[][2] = { { 7168, 2048 }, { 3072, 2048 } };
	dsk_gemm *g;
	if (dsk_gemm_create(NULL, &g, &e))
		return 1;
	printf("%-6s %6s %6s %6s %10s %10s %10s %10s\n", "type", "M", "N", "K", "ms", "TFLOP/s", "quant ms",
	       "gemm TF/s");
	for (int fp8 = 1; fp8 >= 0; fp8--) {
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
			bench_one(g, fp8, shapes[s][0], shapes[s][1], shapes[s][2], 1);
		for (size_t s = 0; s < sizeof(small_nk) / sizeof(small_nk[0]); s++)
			for (size_t m = 0; m < sizeof(small_m) / sizeof(small_m[0]); m++)
				for (int gemv = 1; gemv >= 0; gemv--)
					bench_one(g, fp8, small_m[m], small_nk[s][0], small_nk[s][1], gemv);
	}
	dsk_gemm_free(g);
	return 0;
}

/* --bench-attn: decode attention (V2-Lite/V3 latent shapes, 16 heads) per
 * call, launches back to back, by split count: T tokens each at context C
 * (median of 5 runs of 50 calls). */

static int bench_attn(void)
{
	ds_err e = { { 0 } };
	const int nh = 16, kvl = 512, rope = 64, nope = 128, kvd = kvl + rope, qk = nope + rope, bt = 64;
	int shapes[][2] = { { 1, 1024 }, { 1, 8192 }, { 8, 1024 }, { 16, 1024 }, { 64, 1024 }, { 64, 8192 } };
	size_t nshapes = sizeof(shapes) / sizeof(shapes[0]);
	/* DS_BENCH_ATTN=T:ctx:splits times that one case (for a profiler) */
	int only_ns = 0;
	if (getenv("DS_BENCH_ATTN") &&
	    sscanf(getenv("DS_BENCH_ATTN"), "%d:%d:%d", &shapes[0][0], &shapes[0][1], &only_ns) == 3)
		nshapes = 1;
	printf("%4s %6s %6s %10s %s\n", "T", "ctx", "splits", "us/call", "(default split count marked *)");
	for (size_t k = 0; k < nshapes; k++) {
		const int T = shapes[k][0], C = shapes[k][1], nb = C / bt;
		void *pool;
		int32_t *tab, *seq, *pos;
		float *q, *qabs, *ws;
		void *lat;
				cudaMalloc(&pool, 2 * (size_t)T * nb * bt * kvd);
		cudaMemset(pool, 0x3c, 2 * (size_t)T * nb * bt * kvd);
		int32_t *ht = malloc(sizeof(int32_t) * (size_t)T * nb), *hs = malloc(sizeof(int32_t) * T),
			*hp = malloc(sizeof(int32_t) * T);
		for (int i = 0; i < T * nb; i++)
			ht[i] = (i * 7) % (T * nb);
		for (int t = 0; t < T; t++) {
			hs[t] = t;
			hp[t] = C - 1;
		}
		cudaMalloc((void **)&tab, sizeof(int32_t) * (size_t)T * nb);
		cudaMemcpy(tab, ht, sizeof(int32_t) * (size_t)T * nb, cudaMemcpyHostToDevice);
		cudaMalloc((void **)&seq, sizeof(int32_t) * T);
		cudaMemcpy(seq, hs, sizeof(int32_t) * T, cudaMemcpyHostToDevice);
		cudaMalloc((void **)&pos, sizeof(int32_t) * T);
		cudaMemcpy(pos, hp, sizeof(int32_t) * T, cudaMemcpyHostToDevice);
		cudaMalloc((void **)&q, 4 * (size_t)T * nh * qk);
		cudaMemset(q, 0, 4 * (size_t)T * nh * qk);
		cudaMalloc((void **)&qabs, 4 * (size_t)T * nh * kvl);
		cudaMemset(qabs, 0, 4 * (size_t)T * nh * kvl);
		cudaMalloc((void **)&ws, 4 * dsk_attn_ws_floats(T, nh, kvl, 64));
		cudaMalloc(&lat, 2 * (size_t)T * nh * kvl);
		dsk_attn_args a = { .g = { .pool = pool, .block_stride = (long)bt * kvd, .layer_stride = (long)bt * kvd,
					   .block_tokens = bt, .tables = tab, .max_blocks = nb },
				    .layer = 0, .q = q, .qabs = qabs, .nh = nh, .nope = nope, .rope = rope, .kvl = kvl,
				    .seq = seq, .pos = pos, .T = T, .max_len = C, .scale = 0.1f, .ws = ws, .lat = lat };
		const int dflt = dsk_attn_splits(T, nh, C, 132);
		cudaEvent_t e0, e1;
		cudaEventCreate(&e0);
		cudaEventCreate(&e1);
		for (int ns = only_ns ? only_ns : 1; ns <= (only_ns ? only_ns : 64); ns *= 2) {
			double ms[5];
			int rc = 0;
			for (int i = 0; i < 5 && !rc; i++)
				rc = dsk_mla_attention(&a, ns, NULL, &e);
			for (int r = 0; r < 5 && !rc; r++) {
				float t;
				cudaEventRecord(e0, NULL);
				for (int i = 0; i < 50 && !rc; i++)
					rc = dsk_mla_attention(&a, ns, NULL, &e);
				cudaEventRecord(e1, NULL);
				cudaEventSynchronize(e1);
				cudaEventElapsedTime(&t, e0, e1);
				ms[r] = t;
			}
			if (rc) {
				printf("%4d %6d %6d failed: %s\n", T, C, ns, e.msg);
				continue;
			}
			printf("%4d %6d %6d %10.2f%s\n", T, C, ns, median(ms, 5) * 1e3 / 50, ns == dflt ? " *" : "");
		}
		if (dflt & (dflt - 1)) /* not a power of two: time it too */
			printf("%4d %6d %6d (default, not timed)\n", T, C, dflt);
		cudaFree(pool);
		cudaFree(tab);
		cudaFree(seq);
		cudaFree(pos);
		cudaFree(q);
		cudaFree(qabs);
		cudaFree(ws);
		cudaFree(lat);
		free(ht);
		free(hs);
		free(hp);
	}
	return 0;
}

/* Temperature-0 draws against a host argmax (the first index of the max):
 * rows of V = 102400 (16-byte vectors, several rounds a thread) and 1003
 * (the scalar scan), with the max tied at two places and an all -inf row. */
static void check_argmax(int V)
{
	enum { R = 5 };
	float *rows = malloc(sizeof(float) * (size_t)R * V);
	int want[R];
	for (int r = 0; r < R; r++) {
		float *row = rows + (size_t)r * V;
		for (int i = 0; i < V; i++)
			row[i] = r == 4 ? -INFINITY : frand() * 8.0f;
		if (r == 1 || r == 2) { /* ties: the lower index wins */
			const int a = (r * 7919) % V, b = V - 1 - (r * 31) % (V / 2);
			row[a] = row[b] = 100.0f;
		}
		int am = 0;
		for (int i = 1; i < V; i++)
			am = row[i] > row[am] ? i : am;
		want[r] = am;
	}
	dsk_draw dr[R];
	for (int r = 0; r < R; r++)
		dr[r] = (dsk_draw){ .temperature = 0.0f };
	float *drows = dup_up(rows, sizeof(float) * (size_t)R * V);
	dsk_draw *ddr = dup_up(dr, sizeof(dr));
	int32_t *dids = dup_up(NULL, sizeof(int32_t) * R), ids[R];
	ds_err e = { { 0 } };
	assert_int_equal(dsk_draw_rows(dids, drows, R, V, V, ddr, NULL, &e), 0);
	down(ids, dids, sizeof(ids));
	for (int r = 0; r < R; r++)
		assert_int_equal(ids[r], want[r]);
	print_message("argmax V=%d: %d rows as the host's (ties, an all -inf row)\n", V, R);
	cudaFree(drows);
	cudaFree(ddr);
	cudaFree(dids);
	free(rows);
}

/* Draws on the GPU against the host sampler's distribution (model/sampler.c,
 * an independent implementation): R copies of one logits row drawn with
 * stratified u = (r + 0.5) / R must hit each token R * p +- 2 times; rows
 * with temperature 0 give the argmax; the same u give the same ids. */
static void test_draw(void **st)
{
	(void)st;
	enum { V = 1000, R = 4000 };
	float *l = malloc(sizeof(float) * V), *p = malloc(sizeof(float) * V), *rows = malloc(sizeof(float) * (size_t)R * V);
	int32_t *ids = malloc(sizeof(int32_t) * R), *ids2 = malloc(sizeof(int32_t) * R);
	dsk_draw *dr = malloc(sizeof(dsk_draw) * R);
	for (int i = 0; i < V; i++) /* a peaked, model-like row */
		l[i] = 6.0f * frand() - 3.0f * fabsf(frand()) * 4.0f;
	int am = 0;
	for (int i = 1; i < V; i++)
		am = l[i] > l[am] ? i : am;
	const struct {
		float t, top_p, min_p;
		int top_k;
	} cases[] = { { 1.0f, 1.0f, 0, 0 }, { 0.7f, 0.9f, 0, 0 }, { 1.3f, 1.0f, 0, 40 },
		      { 1.0f, 0.8f, 0.02f, 100 }, { 0.5f, 1.0f, 0.1f, 0 } };
	ds_err e = { { 0 } };
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		ds_sampling sp;
		ds_sampling_default(&sp);
		sp.temperature = cases[c].t;
		sp.top_p = cases[c].top_p;
		sp.min_p = cases[c].min_p;
		sp.top_k = cases[c].top_k;
		ds_sampler *s;
		assert_int_equal(ds_sampler_new(&sp, V, &s), 0);
		ds_sampler_probs(s, l, p);
		ds_sampler_free(s);
		for (int r = 0; r < R; r++) {
			memcpy(rows + (size_t)r * V, l, sizeof(float) * V);
			dr[r] = (dsk_draw){ .temperature = r % 97 == 5 ? 0.0f : sp.temperature, .top_p = sp.top_p,
					    .min_p = sp.min_p, .u = (float)((r + 0.5) / R), .top_k = sp.top_k };
		}
		for (int pass = 0; pass < 2; pass++) {
			float *drows = dup_up(rows, sizeof(float) * (size_t)R * V);
			dsk_draw *ddr = dup_up(dr, sizeof(dsk_draw) * R);
			int32_t *dids = dup_up(NULL, sizeof(int32_t) * R);
			if (dsk_draw_rows(dids, drows, R, V, V, ddr, NULL, &e))
				fail_msg("draw: %s", e.msg);
			down(pass ? ids2 : ids, dids, sizeof(int32_t) * R);
			cudaFree(drows);
			cudaFree(ddr);
			cudaFree(dids);
		}
		assert_memory_equal(ids, ids2, sizeof(int32_t) * R);
		/* What the host's draw gives for each u: the first token whose
		 * cumulative probability in id order exceeds u. */
		int *cnt = calloc(V, sizeof(int)), *want = calloc(V, sizeof(int)), n = 0;
		for (int r = 0; r < R; r++) {
			if (dr[r].temperature == 0) {
				assert_int_equal(ids[r], am);
				continue;
			}
			assert_true(ids[r] >= 0 && ids[r] < V);
			cnt[ids[r]]++;
			double f = 0;
			int j = 0, last = 0;
			for (; j < V; j++) {
				if (p[j] <= 0)
					continue;
				last = j;
				if ((f += p[j]) > dr[r].u)
					break;
			}
			want[j < V ? j : last]++;
			n++;
		}
		int worst = 0, kept = 0;
		for (int i = 0; i < V; i++) {
			const int d = abs(cnt[i] - want[i]);
			worst = d > worst ? d : worst;
			kept += p[i] > 0;
			if (p[i] == 0 && cnt[i])
				fail_msg("case %zu: token %d drawn %d times, filtered out on the host", c, i, cnt[i]);
		}
		print_message("draw T %.1f top_p %.2f min_p %.2f top_k %d: %d tokens kept, %d draws, worst |GPU - host| "
			      "count %d\n", cases[c].t, cases[c].top_p, cases[c].min_p, cases[c].top_k, kept, n, worst);
		/* the same u falls on the same token but at rounding boundaries */
		assert_true(worst <= 2);
		free(cnt);
		free(want);
	}
	free(l);
	free(p);
	free(rows);
	free(ids);
	free(ids2);
	free(dr);
	check_argmax(102400);
	check_argmax(1003);
}

int main(int argc, char **argv)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("test_cuda_ops: no GPU, skipped\n");
		return 77;
	}
	ds_dtype_init();
	if (argc > 1 && !strcmp(argv[1], "--bench"))
		return bench();
	if (argc > 1 && !strcmp(argv[1], "--bench-attn"))
		return bench_attn();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_gemm_bf16),
		cmocka_unit_test(test_gemm_fp8),
		cmocka_unit_test(test_rmsnorm_silu),
		cmocka_unit_test(test_norm_fp8),
		cmocka_unit_test(test_route),
		cmocka_unit_test(test_attention),
		cmocka_unit_test(test_draw),
		cmocka_unit_test(test_gemv_fused),
		cmocka_unit_test(test_moe_gemv),
		cmocka_unit_test(test_gemv_heads),
		cmocka_unit_test(test_mla_prep),
	};
	if (getenv("DS_TEST_FILTER")) /* e.g. one test under compute-sanitizer */
		cmocka_set_test_filter(getenv("DS_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
