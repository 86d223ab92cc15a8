/* The kernels of long prompt chunks against float64 loops on fresh random
 * inputs: the flash prefill attention (causal, after a prefix, padded rows
 * and heads) and the grouped expert GEMMs, bf16 and FP8 with DeepSeek's
 * block scaling (uneven and empty experts, rows by index).
 * `test_cuda_prefill --bench` times the flash kernel at V2-Lite's and V3's
 * head counts. Exits 77 without a GPU. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "kernels/flash.h"
#include "kernels/gemm.h"
#include "kernels/moe_gemm.h"
#include "model/cpu_ops.h"
#include "model/dtype.h"
#include "tests/bench_util.h"
#include "tests/cuda_test_util.h"

/* The flash prefill kernel against float64 causal attention from the same
 * bf16 inputs: n queries from position p0 over len = p0 + n keys, nh heads,
 * queries and outputs in rows wider than the heads (as in a step's buffers),
 * roped keys in rows of a latent cache (kvl = 64 before them). Error per
 * output row relative to its norm: a mask off by one key moves the first
 * rows by tens of percent, a wrong row or head everything. */
static void check_flash(int nope, int rope, int vd, int nh, int n, int p0)
{
	ds_err e = { { 0 } };
	const int qk = nope + rope, kw = nope + vd, len = p0 + n, kvl = 64, kpe_ld = kvl + rope;
	const int q_ld = (nh + 1) * qk, o_ld = (nh + 2) * vd; /* a head of padding each */
	const float scale = 0.8f / sqrtf((float)qk);
	uint16_t *q = malloc(2 * (size_t)n * q_ld), *kv = malloc(2 * (size_t)nh * len * kw),
		 *kc = malloc(2 * (size_t)len * kpe_ld), *ob = malloc(2 * (size_t)n * o_ld);
	uint16_t *dq = rand_bf16(q, (size_t)n * q_ld, 1.0f), *dkv = rand_bf16(kv, (size_t)nh * len * kw, 1.0f),
		 *dkc = rand_bf16(kc, (size_t)len * kpe_ld, 1.0f), *dout = dup_up(NULL, 2 * (size_t)n * o_ld);
	dsk_flash_args a = { .q = (const dsk_bf16 *)dq + qk, .kv = (const dsk_bf16 *)dkv,
			     .kpe = (const dsk_bf16 *)dkc + kvl, .o = (dsk_bf16 *)dout + vd, .q_ld = q_ld,
			     .kpe_ld = kpe_ld, .o_ld = o_ld, .nh = nh, .nope = nope, .rope = rope, .vd = vd, .n = n,
			     .len = len, .p0 = p0, .scale = scale };
	assert_true(dsk_flash_ok(nope, rope, vd));
	if (dsk_flash_prefill(&a, NULL, &e))
		fail_msg("flash: %s", e.msg);
	down(ob, dout, 2 * (size_t)n * o_ld);
	double worst = 0, sum = 0;
	double *sc = malloc(sizeof(double) * len), *ref = malloc(sizeof(double) * vd);
	for (int i = 0; i < n; i++)
		for (int h = 0; h < nh; h++) {
			const uint16_t *qr = q + (size_t)i * q_ld + (size_t)(h + 1) * qk;
			const int nk = p0 + i + 1;
			double mx = -INFINITY, tot = 0;
			for (int j = 0; j < nk; j++) {
				const uint16_t *kr = kv + ((size_t)h * len + j) * kw, *pe = kc + (size_t)j * kpe_ld + kvl;
				double d = 0;
				for (int k = 0; k < nope; k++)
					d += (double)ds_bf16_to_f32(qr[k]) * ds_bf16_to_f32(kr[k]);
				for (int k = 0; k < rope; k++)
					d += (double)ds_bf16_to_f32(qr[nope + k]) * ds_bf16_to_f32(pe[k]);
				sc[j] = d * scale;
				mx = fmax(mx, sc[j]);
			}
			for (int j = 0; j < nk; j++)
				tot += (sc[j] = exp(sc[j] - mx));
			double num = 0, den = 0;
			for (int v = 0; v < vd; v++) {
				double acc = 0;
				for (int j = 0; j < nk; j++)
					acc += sc[j] * ds_bf16_to_f32(kv[((size_t)h * len + j) * kw + nope + v]);
				ref[v] = acc / tot;
				const double d = ds_bf16_to_f32(ob[(size_t)i * o_ld + (size_t)(h + 1) * vd + v]) - ref[v];
				num += d * d;
				den += ref[v] * ref[v];
			}
			const double r = sqrt(num / den);
			worst = isnan(r) || r > worst ? (isnan(r) ? INFINITY : r) : worst;
			sum += r;
		}
	/* the heads' padding around them stays untouched (poisoned 0xffff) */
	for (int i = 0; i < n; i++)
		for (int v = 0; v < vd; v++)
			assert_int_equal(ob[(size_t)i * o_ld + v], 0xffff);
	print_message("flash prefill %d+%d/%d, %d heads, %d queries from %d: row rel err mean %.3g, max %.3g\n", nope,
		      rope, vd, nh, n, p0, sum / ((double)n * nh), worst);
	/* bf16 inputs and outputs (~2^-9 each; H100: max 0.0025 a row) */
	assert_true(worst < 8e-3);
	free(sc);
	free(ref);
	free(q);
	free(kv);
	free(kc);
	free(ob);
	cudaFree(dq);
	cudaFree(dkv);
	cudaFree(dkc);
	cudaFree(dout);
}

static void test_flash(void **st)
{
	(void)st;
	check_flash(128, 64, 128, 3, 200, 0);  /* four query tiles, the last partial */
	check_flash(128, 64, 128, 2, 100, 333); /* after a cached prefix, off the tile grid */
	check_flash(32, 16, 32, 4, 64, 0);     /* one tile: every key on the diagonal */
	check_flash(32, 32, 32, 2, 130, 5);
	assert_false(dsk_flash_ok(64, 64, 64));
}

/* Grouped expert GEMMs against a float64 loop: E experts with uneven row
 * counts (some empty, some over one 128-row tile, one not a multiple of
 * 16), N not a multiple of the block's columns; GLU (SiLU(g) * u, bf16) and
 * plain (float). Rows past off[E] stay untouched. */
static void check_moe_gemm(int E, int N, int K, int glu, int indirect)
{
	ds_err e = { { 0 } };
	int32_t off[65];
	off[0] = 0;
	for (int x = 0; x < E; x++)
		off[x + 1] = off[x] + (x % 5 == 3 ? 0 : x == 1 ? 300 : x == 2 ? 129 : 16 + 16 * (x % 4) + (x == 4));
	const int P = off[E], R = P + 8;
	/* indirect: plan row r reads x row src[r] of 50 (every 7th a padding row, -1) */
	int32_t *src = malloc(sizeof(int32_t) * (size_t)P);
	for (int r = 0; r < P; r++)
		src[r] = !indirect ? r : r % 7 == 6 ? -1 : (r * 13) % 50;
	uint16_t *xh = malloc(2 * (size_t)R * K), *wh = malloc(2 * (size_t)2 * E * N * K);
	uint16_t *dx = rand_bf16(xh, (size_t)R * K, 1.0f), *dw = rand_bf16(wh, (size_t)2 * E * N * K, 1.0f / sqrtf((float)K));
	const void *hp0[64], *hp1[64];
	for (int x = 0; x < E; x++) {
		hp0[x] = dw + (size_t)x * N * K;
		hp1[x] = dw + (size_t)(E + x) * N * K;
	}
	void *dp0 = dup_up(hp0, sizeof(void *) * E), *dp1 = dup_up(hp1, sizeof(void *) * E);
	int32_t *doff = dup_up(off, sizeof(int32_t) * (E + 1));
	const size_t ob = glu ? 2 : 4;
	void *dout = dup_up(NULL, ob * (size_t)R * N);
	int32_t *dsrc = dup_up(src, sizeof(int32_t) * (size_t)P);
	dsk_moe_gemm_args a = { .x = (const dsk_bf16 *)dx, .row_src = indirect ? dsrc : NULL, .off = doff, .w0 = dp0,
				.w1 = dp1, .out = dout, .E = E, .N = N, .K = K, .ldo = N, .max_rows = P };
	assert_true(dsk_moe_gemm_ok(E, N, K));
	if (dsk_moe_gemm(&a, glu, NULL, &e))
		fail_msg("moe_gemm: %s", e.msg);
	unsigned char *out = malloc(ob * (size_t)R * N);
	down(out, dout, ob * (size_t)R * N);
	double num = 0, den = 0;
	for (int x = 0; x < E; x++)
		for (int r = off[x]; r < off[x + 1]; r++)
			for (int n = 0; n < N; n++) {
				double g = 0, u = 0;
				const uint16_t *xr = xh + (size_t)(src[r] < 0 ? 0 : src[r]) * K,
					       *w0 = wh + ((size_t)x * N + n) * K, *w1 = wh + ((size_t)(E + x) * N + n) * K;
				for (int k = 0; k < K && src[r] >= 0; k++) {
					g += (double)ds_bf16_to_f32(xr[k]) * ds_bf16_to_f32(w0[k]);
					if (glu)
						u += (double)ds_bf16_to_f32(xr[k]) * ds_bf16_to_f32(w1[k]);
				}
				const double want = glu ? g / (1 + exp(-g)) * u : g;
				const double got = glu ? ds_bf16_to_f32(((uint16_t *)out)[(size_t)r * N + n])
						       : ((float *)out)[(size_t)r * N + n];
				num += (got - want) * (got - want);
				den += want * want;
			}
	for (size_t i = (size_t)P * N * ob; i < (size_t)R * N * ob; i++)
		assert_int_equal(out[i], 0xff);
	const double r = sqrt(num / den);
	print_message("moe gemm %s%s, %d experts, %d rows, N %d K %d: rel err %.3g\n", glu ? "glu" : "plain",
		      indirect ? " (rows by index)" : "", E, P, N, K, r);
	assert_true(r < (glu ? 6e-3 : 1e-4));
	free(xh);
	free(wh);
	free(out);
	free(src);
	cudaFree(dsrc);
	cudaFree(dx);
	cudaFree(dw);
	cudaFree(dp0);
	cudaFree(dp1);
	cudaFree(doff);
	cudaFree(dout);
}

/* The FP8 grouped GEMMs against float64 over the same quantized operands:
 * e4m3 weights with 128x128 block scales, activations quantized on the
 * device per 1x128 group (dsk_quant_fp8); experts padded to 16 rows as the
 * plan lays them out (some empty, one over two tiles); GLU and plain. */
static void check_moe_gemm_fp8(int E, int N, int K, int glu, int indirect)
{
	ds_err e = { { 0 } };
	int32_t off[65];
	off[0] = 0;
	for (int x = 0; x < E; x++)
		off[x + 1] = off[x] + 16 * (x % 5 == 3 ? 0 : x == 1 ? 19 : 1 + x % 4);
	const int P = off[E], sr = (N + 127) / 128, sc = K / 128, sld = (sc + 3) & ~3;
	/* indirect: plan row r reads x row src[r] of X = 64 (every 7th -1) */
	const int X = indirect ? 64 : P;
	int32_t *src = malloc(sizeof(int32_t) * (size_t)P);
	for (int r = 0; r < P; r++)
		src[r] = !indirect ? r : r % 7 == 6 ? -1 : (r * 13) % X;
	int32_t *dsrc = dup_up(src, sizeof(int32_t) * (size_t)P);
	uint16_t *xh = malloc(2 * (size_t)X * K);
	uint16_t *dx = rand_bf16(xh, (size_t)X * K, 2.0f);
	uint8_t *dq = dup_up(NULL, (size_t)X * K), *qh = malloc((size_t)X * K);
	float *dqs = dup_up(NULL, 4 * (size_t)X * sc), *qsh = malloc(4 * (size_t)X * sc);
	assert_int_equal(dsk_quant_fp8(dq, dqs, (const dsk_bf16 *)dx, X, K, NULL, &e), 0);
	down(qh, dq, (size_t)X * K);
	down(qsh, dqs, 4 * (size_t)X * sc);
	uint8_t *wh = malloc((size_t)2 * E * N * K);
	float *sh = malloc(4 * (size_t)2 * E * sr * sc), *shp = malloc(4 * (size_t)2 * E * sr * sld);
	const void *hp0[64], *hp1[64];
	const float *hs0[64], *hs1[64];
	void *dev_w[128], *dev_s[128];
	for (int m = 0; m < 2 * E; m++) {
		rand_host_weight(1, N, K, wh + (size_t)m * N * K, sh + (size_t)m * sr * sc, shp + (size_t)m * sr * sld);
		dev_w[m] = dup_up(wh + (size_t)m * N * K, (size_t)N * K);
		dev_s[m] = dup_up(shp + (size_t)m * sr * sld, 4 * (size_t)sr * sld);
	}
	for (int x = 0; x < E; x++) {
		hp0[x] = dev_w[x];
		hp1[x] = dev_w[E + x];
		hs0[x] = dev_s[x];
		hs1[x] = dev_s[E + x];
	}
	void *dp0 = dup_up(hp0, sizeof(void *) * E), *dp1 = dup_up(hp1, sizeof(void *) * E);
	void *ds0 = dup_up(hs0, sizeof(void *) * E), *ds1 = dup_up(hs1, sizeof(void *) * E);
	int32_t *doff = dup_up(off, sizeof(int32_t) * (E + 1));
	const size_t ob = glu ? 2 : 4;
	void *dout = dup_up(NULL, ob * (size_t)P * N);
	dsk_moe_gemm_args a = { .x = dq, .row_src = indirect ? dsrc : NULL, .off = doff, .w0 = dp0, .w1 = dp1,
				.out = dout, .E = E, .N = N, .K = K, .ldo = N, .max_rows = P, .fp8 = 1, .xs = dqs,
				.xs_ld = X, .s0 = ds0, .s1 = ds1, .sld = sld };
	if (dsk_moe_gemm(&a, glu, NULL, &e))
		fail_msg("moe_gemm fp8: %s", e.msg);
	unsigned char *out = malloc(ob * (size_t)P * N);
	down(out, dout, ob * (size_t)P * N);
	double num = 0, den = 0;
	for (int x = 0; x < E; x++)
		for (int r = off[x]; r < off[x + 1]; r++)
			for (int n = 0; n < N; n++) {
				double acc[2] = { 0, 0 };
				const int xr = src[r];
				for (int j = 0; j < (glu ? 2 : 1) && xr >= 0; j++) {
					const int m = j * E + x;
					const uint8_t *wr = wh + ((size_t)m * N + n) * K;
					for (int k = 0; k < K; k++)
						acc[j] += (double)ds_fp8e4m3_lut[qh[(size_t)xr * K + k]] *
							  qsh[(size_t)(k / 128) * X + xr] * ds_fp8e4m3_lut[wr[k]] *
							  sh[((size_t)m * sr + n / 128) * sc + k / 128];
				}
				const double want = glu ? acc[0] / (1 + exp(-acc[0])) * acc[1] : acc[0];
				const double got = glu ? ds_bf16_to_f32(((uint16_t *)out)[(size_t)r * N + n])
						       : ((float *)out)[(size_t)r * N + n];
				num += (got - want) * (got - want);
				den += want * want;
			}
	const double r = sqrt(num / den);
	print_message("moe gemm fp8 %s%s, %d experts, %d rows, N %d K %d: rel err %.3g\n", glu ? "glu" : "plain",
		      indirect ? " (rows by index)" : "", E, P, N, K, r);
	assert_true(r < (glu ? 6e-3 : 1e-5));
	for (int m = 0; m < 2 * E; m++) {
		cudaFree(dev_w[m]);
		cudaFree(dev_s[m]);
	}
	void *dev[] = { dx, dq, dqs, dp0, dp1, ds0, ds1, doff, dout, dsrc };
	FREE_ALL(dev);
	free(src);
	free(xh);
	free(qh);
	free(qsh);
	free(wh);
	free(sh);
	free(shp);
	free(out);
}

static void test_moe_gemm(void **st)
{
	(void)st;
	check_moe_gemm_fp8(16, 1408, 2048, 1, 0); /* V2-Lite's experts */
	check_moe_gemm_fp8(16, 2048, 1408, 0, 0);
	check_moe_gemm_fp8(9, 208, 256, 1, 0);    /* a partial 128-row weight block */
	check_moe_gemm_fp8(9, 208, 256, 1, 1);    /* the device plan's rows: token rows by index */
	check_moe_gemm(16, 1408, 256, 1, 0); /* V2-Lite's expert width; 22 column blocks */
	check_moe_gemm(16, 256, 1408, 0, 0);
	check_moe_gemm(9, 144, 96, 1, 0);    /* columns past the last block of 64 */
	check_moe_gemm(64, 208, 128, 0, 0);
	check_moe_gemm(16, 1408, 256, 1, 1); /* the device plan's rows: token rows by index */
	check_moe_gemm(9, 144, 96, 1, 1);
	assert_false(dsk_moe_gemm_ok(300, 128, 128));
	assert_false(dsk_moe_gemm_ok(8, 128, 100));
}

/* The flash prefill kernel at V2-Lite's (16 heads) and V3's (128) shapes,
 * 4096 new tokens (and 1024 after a 3072-token prefix): TFLOP/s counts the
 * causal half, 2 (qk + vd) flops a query-key pair and head. */
static int bench_flash(void)
{
	ds_err e = { { 0 } };
	const int nope = 128, rope = 64, vd = 128, qk = nope + rope, kw = nope + vd, kvd = 512 + rope;
	const int cases[][3] = { { 16, 4096, 0 }, { 128, 4096, 0 }, { 16, 1024, 3072 } };
	printf("\n%6s %6s %6s %10s %9s\n", "heads", "new", "prefix", "us/call", "TFLOP/s");
	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		const int nh = cases[k][0], n = cases[k][1], p0 = cases[k][2], len = p0 + n;
		void *q, *kv, *kc, *o;
		cudaMalloc(&q, 2 * (size_t)n * nh * qk);
		cudaMalloc(&kv, 2 * (size_t)nh * len * kw);
		cudaMalloc(&kc, 2 * (size_t)len * kvd);
		cudaMalloc(&o, 2 * (size_t)n * nh * vd);
		cudaMemset(q, 0x3c, 2 * (size_t)n * nh * qk);
		cudaMemset(kv, 0x3c, 2 * (size_t)nh * len * kw);
		cudaMemset(kc, 0x3c, 2 * (size_t)len * kvd);
		dsk_flash_args a = { .q = q, .kv = kv, .kpe = (const dsk_bf16 *)kc + 512, .o = o, .q_ld = nh * qk,
				     .kpe_ld = kvd, .o_ld = nh * vd, .nh = nh, .nope = nope, .rope = rope, .vd = vd,
				     .n = n, .len = len, .p0 = p0, .scale = 0.07f };
		cudaEvent_t e0, e1;
		cudaEventCreate(&e0);
		cudaEventCreate(&e1);
		double ms[5];
		int rc = dsk_flash_prefill(&a, NULL, &e);
		for (int r = 0; r < 5 && !rc; r++) {
			float t;
			cudaEventRecord(e0, NULL);
			for (int i = 0; i < 10 && !rc; i++)
				rc = dsk_flash_prefill(&a, NULL, &e);
			cudaEventRecord(e1, NULL);
			cudaEventSynchronize(e1);
			cudaEventElapsedTime(&t, e0, e1);
			ms[r] = t / 10;
		}
		if (rc)
			printf("%6d %6d %6d failed: %s\n", nh, n, p0, e.msg);
		else {
			const double pairs = (double)n * p0 + (double)n * (n + 1) / 2, us = median(ms, 5) * 1e3;
			printf("%6d %6d %6d %10.1f %9.1f\n", nh, n, p0, us, 2.0 * pairs * nh * (qk + vd) / us * 1e-6);
		}
		cudaEventDestroy(e0);
		cudaEventDestroy(e1);
		cudaFree(q);
		cudaFree(kv);
		cudaFree(kc);
		cudaFree(o);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("test_cuda_prefill: no GPU, skipped\n");
		return 77;
	}
	ds_dtype_init();
	if (argc > 1 && !strcmp(argv[1], "--bench"))
		return bench_flash();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_flash),
		cmocka_unit_test(test_moe_gemm),
	};
	if (getenv("DS_TEST_FILTER"))
		cmocka_set_test_filter(getenv("DS_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
