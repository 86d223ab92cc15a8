/* gemm.cu — cuBLASLt GEMMs, bf16 and block-scaled FP8 (see gemm.h).
 * Row-major out[M][N] = x[M][K] W[N][K]^T is, in cuBLAS's column-major
 * terms, D(N x M) = op_T(A = W, K x N) * op_N(B = x, K x M): the TN layout
 * the FP8 block-scaled mode requires. Algorithms are cached per shape. */
#include <cublasLt.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/fp8q.cuh"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/launch.cuh"

#define WS_BYTES (32u << 20)
#define CACHE 512

typedef struct {
	int used, type, outbf, m, n, k, ldo, ok;
	cublasLtMatmulDesc_t op;
	cublasLtMatrixLayout_t la, lb, ld;
	cublasLtMatmulAlgo_t algo;
} algo_slot;

struct dsk_gemm {
	cublasLtHandle_t lt;
	cudaStream_t s;
	void *ws;
	uint8_t *q;     /* quantized activations */
	float *qs;      /* their scales */
	const dsk_bf16 *pre_x; /* dsk_gemm_prequant */
	const uint8_t *pre_q;
	const float *pre_s;
	int pre_m;
	size_t q_cap;   /* elements of q */
	dsk_bf16 *tmp;  /* bf16 result widened to float32 */
	size_t tmp_cap;
	unsigned gen;   /* see dsk_gemm_generation */
	int no_gemv;    /* force cuBLASLt for every M (tests, benchmarks) */
	algo_slot cache[CACHE];
};

static void slot_clear(algo_slot *a);

static int lt_err(ds_err *e, cublasStatus_t st, const char *what)
{
	return ds_errf(e, st == CUBLAS_STATUS_NOT_SUPPORTED ? -ENOTSUP : -EIO, "cublasLt: %s: status %d", what,
		       (int)st);
}

extern "C" int dsk_gemm_create(dsk_stream s, dsk_gemm **out, ds_err *e)
{
	dsk_gemm *g = (dsk_gemm *)calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->s = s;
	cublasStatus_t st = cublasLtCreate(&g->lt);
	if (st != CUBLAS_STATUS_SUCCESS) {
		free(g);
		return lt_err(e, st, "create");
	}
	if (cudaMalloc(&g->ws, WS_BYTES) != cudaSuccess) {
		cudaGetLastError();
		cublasLtDestroy(g->lt);
		free(g);
		return ds_errf(e, -ENOMEM, "cuda: no memory for the GEMM workspace");
	}
	*out = g;
	return 0;
}

extern "C" unsigned dsk_gemm_generation(const dsk_gemm *g) { return g->gen; }

extern "C" dsk_gemm *dsk_gemm_free(dsk_gemm *g)
{
	if (!g)
		return NULL;
	cudaFree(g->ws);
	cudaFree(g->q);
	cudaFree(g->qs);
	cudaFree(g->tmp);
	for (int i = 0; i < CACHE; i++)
		slot_clear(&g->cache[i]);
	cublasLtDestroy(g->lt);
	free(g);
	return NULL;
}

extern "C" void dsk_gemm_set_gemv(dsk_gemm *g, int on) { g->no_gemv = !on; }

/* A warp quantizes two 1x128 groups, a half warp each with one 16-byte
 * load a lane (4 values a lane in 2-byte loads ran at ~1.8 TB/s). */
static __global__ void quant_k(uint8_t *q, float *sc, const dsk_bf16 *x, int M, int K, const int32_t *rows)
{
	dsk_pdl_enter();
	const int groups = K / 128, lane = threadIdx.x & 31, hl = lane & 15;
	const long gid = ((long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * 2 + (lane >> 4);
	/* both halves take part in the shuffles: one past the end computes on zeros */
	const bool in = gid < (long)(rows ? *rows : M) * groups;
	const int m = in ? (int)(gid / groups) : 0, kb = in ? (int)(gid % groups) : 0;
	const uint4 raw = in ? *(const uint4 *)(x + (size_t)m * K + kb * 128 + hl * 8) : make_uint4(0, 0, 0, 0);
	const __nv_bfloat162 *b2 = (const __nv_bfloat162 *)&raw;
	float v[8];
	for (int i = 0; i < 4; i++) {
		const float2 f = __bfloat1622float2(b2[i]);
		v[2 * i] = f.x;
		v[2 * i + 1] = f.y;
	}
	const float s = dsk_fp8_group<8>(v, in ? q + (size_t)m * K + kb * 128 + hl * 8 : NULL);
	if (in && hl == 0)
		sc[(size_t)kb * M + m] = s;
}

extern "C" int dsk_quant_fp8_dev(uint8_t *q, float *sc, const dsk_bf16 *x, const int32_t *rows, int max_rows, int K,
				 dsk_stream s, ds_err *e)
{
	if ((uintptr_t)x % 16)
		return ds_errf(e, -EINVAL, "fp8 quantization: rows not 16-byte aligned");
	if (K % 128)
		return ds_errf(e, -EINVAL, "fp8 quantization: K=%d is not a multiple of 128", K);
	long groups = (long)max_rows * (K / 128);
	if (groups == 0)
		return 0;
	dsk_launch(quant_k, (unsigned)((groups + 15) / 16), 256, 0, s, q, sc, x, max_rows, K, rows);
	return dsk_check(e, "quant_fp8");
}

extern "C" int dsk_quant_fp8(uint8_t *q, float *sc, const dsk_bf16 *x, int M, int K, dsk_stream s, ds_err *e)
{
	return dsk_quant_fp8_dev(q, sc, x, NULL, M, K, s, e);
}

static __global__ void dequant_k(dsk_bf16 *out, const uint8_t *w, const float *sc, int rows, int cols, int sld)
{
	dsk_pdl_enter();
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)rows * cols)
		return;
	int r = (int)(i / cols), c = (int)(i % cols);
	__nv_fp8_e4m3 f;
	f.__x = w[i];
	out[i] = __float2bfloat16((float)f * sc[(size_t)(r / 128) * sld + c / 128]);
}

extern "C" int dsk_dequant_fp8(dsk_bf16 *out, const dsk_weight *W, dsk_stream s, ds_err *e)
{
	size_t n = (size_t)W->rows * W->cols;
	if (n == 0)
		return 0;
	dsk_launch(dequant_k, (unsigned)((n + 255) / 256), 256, 0, s, out, (const uint8_t *)W->w, W->scale, W->rows,
		   W->cols, W->sld);
	return dsk_check(e, "dequant_fp8");
}

static int grow_q(dsk_gemm *g, size_t elems, int M, int K, ds_err *e)
{
	size_t sc = (size_t)M * (K / 128);
	if (elems <= g->q_cap && sc <= g->q_cap / 128)
		return 0;
	g->gen++;
	cudaFree(g->q);
	cudaFree(g->qs);
	g->q = NULL;
	g->qs = NULL;
	g->q_cap = 0;
	size_t cap = elems + elems / 4;
	if (cudaMalloc(&g->q, cap) != cudaSuccess || cudaMalloc(&g->qs, sizeof(float) * (cap / 128 + 1)) != cudaSuccess) {
		cudaGetLastError();
		return ds_errf(e, -ENOMEM, "cuda: no memory for %zu quantized activations", cap);
	}
	g->q_cap = cap;
	return 0;
}

static algo_slot *lookup(dsk_gemm *g, int type, int outbf, int m, int n, int k, int ldo)
{
	unsigned h = (unsigned)(m * 2654435761u) ^ (unsigned)(n * 40503u) ^ (unsigned)(k * 9973u) ^
		     (unsigned)(ldo * 31u) ^ (unsigned)(type * 7 + outbf);
	for (int i = 0; i < CACHE; i++) {
		algo_slot *a = &g->cache[(h + i) % CACHE];
		if (!a->used || (a->type == type && a->outbf == outbf && a->m == m && a->n == n && a->k == k && a->ldo == ldo))
			return a;
	}
	return &g->cache[h % CACHE]; /* full: evict */
}

static __global__ void widen_k(float *out, int ldo, const dsk_bf16 *in, int M, int N)
{
	dsk_pdl_enter();
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i < (size_t)M * N)
		out[(i / N) * ldo + i % N] = __bfloat162float(in[i]);
}

static void slot_clear(algo_slot *a)
{
	if (a->op)
		cublasLtMatmulDescDestroy(a->op);
	if (a->la)
		cublasLtMatrixLayoutDestroy(a->la);
	if (a->lb)
		cublasLtMatrixLayoutDestroy(a->lb);
	if (a->ld)
		cublasLtMatrixLayoutDestroy(a->ld);
	memset(a, 0, sizeof(*a));
}

/* Descriptors and the heuristic's algorithm for one shape, made once. */
static cublasStatus_t slot_fill(dsk_gemm *g, algo_slot *a, int fp8, int outbf, int Mp, int N, int K, int ldo,
				 const float *ascale)
{
	cudaDataType_t ab = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF, dt = outbf ? CUDA_R_16BF : CUDA_R_32F;
	cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
	cublasLtMatmulPreference_t pref = NULL;
	cublasStatus_t st = cublasLtMatmulDescCreate(&a->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA));
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB));
	if (fp8 && st == CUBLAS_STATUS_SUCCESS) {
		/* The heuristic needs the scale pointers set, not only the modes. */
		int32_t am = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, bm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
		const void *as = ascale, *bs = g->qs;
		st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am, sizeof(am));
		if (st == CUBLAS_STATUS_SUCCESS)
			st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm, sizeof(bm));
		if (st == CUBLAS_STATUS_SUCCESS)
			st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &as, sizeof(as));
		if (st == CUBLAS_STATUS_SUCCESS)
			st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &bs, sizeof(bs));
	}
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatrixLayoutCreate(&a->la, ab, K, N, K);
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatrixLayoutCreate(&a->lb, ab, K, Mp, K);
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatrixLayoutCreate(&a->ld, dt, N, Mp, ldo);
	if (st != CUBLAS_STATUS_SUCCESS)
		return st;
	size_t wsb = WS_BYTES;
	cublasLtMatmulHeuristicResult_t hr;
	int found = 0;
	memset(&hr, 0, sizeof(hr));
	st = cublasLtMatmulPreferenceCreate(&pref);
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb));
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatmulAlgoGetHeuristic(g->lt, a->op, a->la, a->lb, a->ld, a->ld, pref, 1, &hr, &found);
	if (pref)
		cublasLtMatmulPreferenceDestroy(pref);
	a->ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
	if (a->ok)
		a->algo = hr.algo;
	return CUBLAS_STATUS_SUCCESS;
}

/* B is x (bf16) or its quantized copy (fp8, scales in g->qs). */
static int matmul(dsk_gemm *g, void *out, int ldo, int outbf, const void *B, int Mp, const dsk_weight *W, ds_err *e)
{
	const int N = W->rows, K = W->cols;
	const int fp8 = W->type == DSK_W_FP8;
	float alpha = 1.0f, beta = 0.0f;
	algo_slot *a = lookup(g, W->type, outbf, Mp, N, K, ldo);
	if (!a->used || a->type != W->type || a->outbf != outbf || a->m != Mp || a->n != N || a->k != K ||
	    a->ldo != ldo) {
		slot_clear(a);
		a->used = 1;
		a->type = W->type;
		a->outbf = outbf;
		a->m = Mp;
		a->n = N;
		a->k = K;
		a->ldo = ldo;
		cublasStatus_t st = slot_fill(g, a, fp8, outbf, Mp, N, K, ldo, W->scale);
		if (st != CUBLAS_STATUS_SUCCESS) {
			slot_clear(a);
			return lt_err(e, st, "descriptors");
		}
	}
	if (!a->ok && fp8 && !outbf) {
		/* Block-scaled FP8 with a float32 result is not offered
		 * everywhere: take bf16 and widen it. */
		if (g->tmp_cap < (size_t)Mp * N) {
			g->gen++;
			cudaFree(g->tmp);
			g->tmp_cap = 0;
			if (cudaMalloc(&g->tmp, sizeof(dsk_bf16) * (size_t)Mp * N) != cudaSuccess) {
				cudaGetLastError();
				return ds_errf(e, -ENOMEM, "cuda: no memory for a %dx%d gemm result", Mp, N);
			}
			g->tmp_cap = (size_t)Mp * N;
		}
		int rc = matmul(g, g->tmp, N, 1, B, Mp, W, e);
		if (rc)
			return rc;
		dsk_launch(widen_k, (unsigned)(((size_t)Mp * N + 255) / 256), 256, 0, g->s, (float *)out, ldo,
			   (const dsk_bf16 *)g->tmp, Mp, N);
		return dsk_check(e, "widen");
	}
	if (!a->ok)
		return ds_errf(e, -ENOTSUP, "cublasLt: no %s algorithm for M=%d N=%d K=%d (%s out)",
			       fp8 ? "block-scaled fp8" : "bf16", Mp, N, K, outbf ? "bf16" : "fp32");
	cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
	if (fp8) {
		const void *as = W->scale, *bs = g->qs;
		st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &as, sizeof(as));
		if (st == CUBLAS_STATUS_SUCCESS)
			st = cublasLtMatmulDescSetAttribute(a->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &bs, sizeof(bs));
	}
	if (st == CUBLAS_STATUS_SUCCESS)
		st = cublasLtMatmul(g->lt, a->op, &alpha, W->w, a->la, B, a->lb, &beta, out, a->ld, out, a->ld, &a->algo,
				    g->ws, WS_BYTES, g->s);
	return st == CUBLAS_STATUS_SUCCESS ? 0 : lt_err(e, st, "matmul");
}


/* Small M (decode) goes through the weight-streaming GEMV (kernels/gemv.h,
 * up to DSK_GEMV_MAX_M rows). FP8 takes the same quantized activations as
 * the block-scaled GEMM, so both paths compute the same function. */
static int gemv_ok(const dsk_gemm *g, const dsk_weight *W, int M)
{
	return !g->no_gemv && M <= DSK_GEMV_MAX_M && W->cols % (W->type == DSK_W_FP8 ? 128 : 8) == 0;
}

static dsk_gemv_job job(void *out, int ldo, const dsk_weight *W)
{
	dsk_gemv_job j = { W->w, W->scale, W->sld, W->rows, out, ldo };
	return j;
}

extern "C" void dsk_gemm_prequant(dsk_gemm *g, const dsk_bf16 *x, int M, const uint8_t *q, const float *sc)
{
	g->pre_x = x;
	g->pre_m = M;
	g->pre_q = q;
	g->pre_s = sc;
}

/* x's FP8 copy into *q / *qs: the producer's (GEMV calls only: its rows past
 * M are not written, and cuBLASLt reads the padded rows) or g->q / g->qs. */
static int quantize(dsk_gemm *g, const dsk_bf16 *x, int M, int K, int gemv, const void **q, const float **qs,
		    ds_err *e)
{
	if (gemv && x == g->pre_x && M == g->pre_m) {
		*q = g->pre_q;
		*qs = g->pre_s;
		return 0;
	}
	const int Mp = dsk_gemm_pad(M);
	int rc = grow_q(g, (size_t)Mp * K, Mp, K, e);
	*q = g->q;
	*qs = g->qs;
	return rc ? rc : dsk_quant_fp8(g->q, g->qs, x, Mp, K, g->s, e);
}

static int run(dsk_gemm *g, void *out, int ldo, int outbf, const dsk_bf16 *x, int M, const dsk_weight *W, ds_err *e)
{
	const int N = W->rows, K = W->cols, Mp = dsk_gemm_pad(M);
	if (M <= 0)
		return 0;
	const int fp8 = W->type == DSK_W_FP8;
	int rc;
	if (fp8 && !dsk_gemm_fp8_ok(N, K))
		return ds_errf(e, -EINVAL, "fp8 gemm: shape %dx%d needs the dequantized path", N, K);
	const int gemv = !outbf && gemv_ok(g, W, M);
	const void *xq = x;
	const float *xs = NULL;
	if (fp8 && (rc = quantize(g, x, M, K, gemv, &xq, &xs, e)))
		return rc;
	if (gemv) {
		dsk_gemv_job j = job(out, ldo, W);
		return dsk_gemv(&j, 1, 0, xq, xs, M, Mp, K, fp8, g->s, e);
	}
	return matmul(g, out, ldo, outbf, xq, Mp, W, e);
}

extern "C" int dsk_gemm_run(dsk_gemm *g, float *out, int ldo, const dsk_bf16 *x, int M, const dsk_weight *W, ds_err *e)
{
	return run(g, out, ldo, 0, x, M, W, e);
}

extern "C" int dsk_gemm_run_bf16(dsk_gemm *g, dsk_bf16 *out, int ldo, const dsk_bf16 *x, int M, const dsk_weight *W,
				 ds_err *e)
{
	return run(g, out, ldo, 1, x, M, W, e);
}

/* Two weights over the same rows in one GEMV launch (one quantization):
 * two outputs, or gate and up into h (glu). */
static int gemv_pair(dsk_gemm *g, const dsk_gemv_job *j, int glu, const dsk_bf16 *x, int M, int K, int fp8,
		     ds_err *e)
{
	int rc;
	const void *xq = x;
	const float *xs = NULL;
	if (fp8 && (rc = quantize(g, x, M, K, 1, &xq, &xs, e)))
		return rc;
	return dsk_gemv(j, 2, glu, xq, xs, M, dsk_gemm_pad(M), K, fp8, g->s, e);
}

extern "C" int dsk_gemm_run2(dsk_gemm *g, float *out0, int ldo0, const dsk_weight *W0, float *out1, int ldo1,
			     const dsk_weight *W1, const dsk_bf16 *x, int M, ds_err *e)
{
	const int fp8 = W0->type == DSK_W_FP8, K = W0->cols;
	if (M <= 0)
		return 0;
	const int same = W1->type == W0->type && W1->cols == K;
	const int fp8_ok = !fp8 || (dsk_gemm_fp8_ok(W0->rows, K) && dsk_gemm_fp8_ok(W1->rows, K));
	if (same && fp8 && fp8_ok && !gemv_ok(g, W0, M)) {
		/* Two cuBLASLt GEMMs on one quantization of x. */
		const void *xq;
		const float *xs;
		int rc = quantize(g, x, M, K, 0, &xq, &xs, e);
		if (!rc)
			rc = matmul(g, out0, ldo0, 0, xq, dsk_gemm_pad(M), W0, e);
		return rc ? rc : matmul(g, out1, ldo1, 0, xq, dsk_gemm_pad(M), W1, e);
	}
	if (!same || !gemv_ok(g, W0, M) || !gemv_ok(g, W1, M) || !fp8_ok) {
		int rc = run(g, out0, ldo0, 0, x, M, W0, e);
		return rc ? rc : run(g, out1, ldo1, 0, x, M, W1, e);
	}
	const dsk_gemv_job j[2] = { job(out0, ldo0, W0), job(out1, ldo1, W1) };
	return gemv_pair(g, j, 0, x, M, K, fp8, e);
}

extern "C" int dsk_gemm_glu(dsk_gemm *g, dsk_bf16 *h, int ldh, const dsk_bf16 *x, int M, const dsk_weight *Wg,
			    const dsk_weight *Wu, ds_err *e)
{
	const int fp8 = Wg->type == DSK_W_FP8, K = Wg->cols;
	if (Wu->type != Wg->type || Wu->cols != K || Wu->rows != Wg->rows || !gemv_ok(g, Wg, M) ||
	    (fp8 && !dsk_gemm_fp8_ok(Wg->rows, K)))
		return -ENOTSUP;
	if (M <= 0)
		return 0;
	const dsk_gemv_job j[2] = { job(h, ldh, Wg), job(NULL, 0, Wu) };
	return gemv_pair(g, j, 1, x, M, K, fp8, e);
}
