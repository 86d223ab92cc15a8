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

#include "kernels/gemm.h"

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
	size_t q_cap;   /* elements of q */
	dsk_bf16 *tmp;  /* bf16 result widened to float32 */
	size_t tmp_cap;
	unsigned gen;   /* see dsk_gemm_generation */
	long n_bf16, n_fp8;
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

extern "C" void dsk_gemm_stats(const dsk_gemm *g, long *b, long *f)
{
	*b = g->n_bf16;
	*f = g->n_fp8;
}

/* One warp per 1x128 group: amax, scale = amax/448, e4m3 with saturation. */
static __global__ void quant_k(uint8_t *q, float *sc, const dsk_bf16 *x, int M, int K)
{
	const int groups = K / 128;
	const long gid = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
	const int lane = threadIdx.x & 31;
	if (gid >= (long)M * groups)
		return;
	const int m = (int)(gid / groups), kb = (int)(gid % groups);
	const dsk_bf16 *src = x + (size_t)m * K + kb * 128 + lane * 4;
	float v[4], amax = 0;
	for (int i = 0; i < 4; i++) {
		v[i] = __bfloat162float(src[i]);
		amax = fmaxf(amax, fabsf(v[i]));
	}
	for (int o = 16; o; o >>= 1)
		amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
	const float s = fmaxf(amax, 1e-10f) / 448.0f;
	const float inv = 1.0f / s;
	uint8_t *dst = q + (size_t)m * K + kb * 128 + lane * 4;
	uint32_t packed = 0;
	for (int i = 0; i < 4; i++) {
		__nv_fp8_e4m3 f(v[i] * inv);
		packed |= (uint32_t)f.__x << (8 * i);
	}
	*(uint32_t *)dst = packed;
	if (lane == 0)
		sc[(size_t)kb * M + m] = s;
}

extern "C" int dsk_quant_fp8(uint8_t *q, float *sc, const dsk_bf16 *x, int M, int K, dsk_stream s, ds_err *e)
{
	if (K % 128)
		return ds_errf(e, -EINVAL, "fp8 quantization: K=%d is not a multiple of 128", K);
	long groups = (long)M * (K / 128);
	if (groups == 0)
		return 0;
	quant_k<<<(unsigned)((groups + 7) / 8), 256, 0, s>>>(q, sc, x, M, K);
	return dsk_check(e, "quant_fp8");
}

static __global__ void dequant_k(dsk_bf16 *out, const uint8_t *w, const float *sc, int rows, int cols, int sld)
{
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
	dequant_k<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(out, (const uint8_t *)W->w, W->scale, W->rows,
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
		widen_k<<<(unsigned)(((size_t)Mp * N + 255) / 256), 256, 0, g->s>>>((float *)out, ldo, g->tmp, Mp, N);
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


/* Small-M path (decode): one warp per output row streams its weight row with
 * 16-byte loads; the M activation rows come through L1. FP8 uses the same
 * quantized activations and scales as the block-scaled GEMM, so both paths
 * compute the same function. */
/* cuBLASLt is faster from M = 8 on (docs/PERFORMANCE.md); the kernel itself
 * handles up to 8 rows. */
#define GEMV_MAX_M 2
template <int M, bool FP8>
static __global__ void __launch_bounds__(256) gemv_k(float *out, int ldo, const void *xv, const float *xs, int Mp,
						     const void *wv, const float *ws, int sld, int N, int K)
{
	const int n = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
	if (n >= N)
		return;
	float acc[M];
#pragma unroll
	for (int m = 0; m < M; m++)
		acc[m] = 0;
	if (FP8) {
		/* 16 fp8 a lane; 8 lanes cover one 128-wide scale block. */
		const uint8_t *w = (const uint8_t *)wv + (size_t)n * K;
		const uint8_t *x = (const uint8_t *)xv;
		const float *wsr = ws + (size_t)(n / 128) * sld;
		for (int k0 = lane * 16; k0 < K; k0 += 4 * 512) {
		uint4 wv[4];
#pragma unroll
		for (int u = 0; u < 4; u++)
			wv[u] = k0 + u * 512 < K ? *(const uint4 *)(w + k0 + u * 512) : make_uint4(0, 0, 0, 0);
#pragma unroll
		for (int u = 0; u < 4; u++) {
			const int k = k0 + u * 512;
			if (k >= K)
				break;
			float wf[16];
			const uint8_t *wb = (const uint8_t *)&wv[u];
#pragma unroll
			for (int i = 0; i < 16; i++) {
				__nv_fp8_e4m3 f;
				f.__x = wb[i];
				wf[i] = (float)f;
			}
			const float sw = wsr[k / 128];
#pragma unroll
			for (int m = 0; m < M; m++) {
				const uint4 xq = *(const uint4 *)(x + (size_t)m * K + k);
				const uint8_t *xb = (const uint8_t *)&xq;
				float d = 0;
#pragma unroll
				for (int i = 0; i < 16; i++) {
					__nv_fp8_e4m3 f;
					f.__x = xb[i];
					d += wf[i] * (float)f;
				}
				acc[m] += d * sw * xs[(size_t)(k / 128) * Mp + m];
			}
		}
		}
	} else {
		const dsk_bf16 *w = (const dsk_bf16 *)wv + (size_t)n * K;
		const dsk_bf16 *x = (const dsk_bf16 *)xv;
		for (int k0 = lane * 8; k0 < K; k0 += 4 * 256) {
		uint4 wv[4];
#pragma unroll
		for (int u = 0; u < 4; u++)
			wv[u] = k0 + u * 256 < K ? *(const uint4 *)(w + k0 + u * 256) : make_uint4(0, 0, 0, 0);
#pragma unroll
		for (int u = 0; u < 4; u++) {
			const int k = k0 + u * 256;
			if (k >= K)
				break;
			const __nv_bfloat162 *w2 = (const __nv_bfloat162 *)&wv[u];
			float2 wf[4];
#pragma unroll
			for (int i = 0; i < 4; i++)
				wf[i] = __bfloat1622float2(w2[i]);
#pragma unroll
			for (int m = 0; m < M; m++) {
				const uint4 xq = *(const uint4 *)(x + (size_t)m * K + k);
				const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)&xq;
#pragma unroll
				for (int i = 0; i < 4; i++) {
					const float2 xf = __bfloat1622float2(x2[i]);
					acc[m] += wf[i].x * xf.x + wf[i].y * xf.y;
				}
			}
		}
		}
	}
#pragma unroll
	for (int m = 0; m < M; m++) {
		float v = acc[m];
		for (int o = 16; o; o >>= 1)
			v += __shfl_xor_sync(0xffffffffu, v, o);
		if (lane == 0)
			out[(size_t)m * ldo + n] = v;
	}
}

template <bool FP8>
static void gemv_launch(int M, float *out, int ldo, const void *x, const float *xs, int Mp, const dsk_weight *W,
			cudaStream_t s)
{
	dim3 grid((W->rows + 7) / 8);
#define GEMV_CASE(m)                                                                                        \
	case m:                                                                                             \
		gemv_k<m, FP8><<<grid, 256, 0, s>>>(out, ldo, x, xs, Mp, W->w, W->scale, W->sld, W->rows, W->cols); \
		break;
	switch (M) {
		GEMV_CASE(1)
		GEMV_CASE(2)
		GEMV_CASE(3)
		GEMV_CASE(4)
		GEMV_CASE(5)
		GEMV_CASE(6)
		GEMV_CASE(7)
		GEMV_CASE(8)
	}
#undef GEMV_CASE
}

/* The GEMV path takes rows whose length is a multiple of 16-byte vectors. */
static int gemv_ok(const dsk_weight *W, int M) { return M <= GEMV_MAX_M && W->cols % (W->type == DSK_W_FP8 ? 128 : 8) == 0; }

static int run(dsk_gemm *g, void *out, int ldo, int outbf, const dsk_bf16 *x, int M, const dsk_weight *W, ds_err *e)
{
	const int N = W->rows, K = W->cols, Mp = dsk_gemm_pad(M);
	if (M <= 0)
		return 0;
	if (W->type == DSK_W_FP8) {
		if (!dsk_gemm_fp8_ok(N, K))
			return ds_errf(e, -EINVAL, "fp8 gemm: shape %dx%d needs the dequantized path", N, K);
		int rc = grow_q(g, (size_t)Mp * K, Mp, K, e);
		if (rc)
			return rc;
		if ((rc = dsk_quant_fp8(g->q, g->qs, x, Mp, K, g->s, e)))
			return rc;
		g->n_fp8++;
		if (!outbf && !g->no_gemv && gemv_ok(W, M)) {
			gemv_launch<true>(M, (float *)out, ldo, g->q, g->qs, Mp, W, g->s);
			return dsk_check(e, "gemv_fp8");
		}
		return matmul(g, out, ldo, outbf, g->q, Mp, W, e);
	}
	g->n_bf16++;
	if (!outbf && !g->no_gemv && gemv_ok(W, M)) {
		gemv_launch<false>(M, (float *)out, ldo, x, NULL, Mp, W, g->s);
		return dsk_check(e, "gemv_bf16");
	}
	return matmul(g, out, ldo, outbf, x, Mp, W, e);
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

/* Grouped GEMV for the routed experts (see gemm.h): block (row tile, expert)
 * reads its expert's row range from the plan on the device, so no count
 * goes back to the host. Rows are taken MR at a time: MR is the most rows
 * an expert can have in the step (up to 8), as registers bound occupancy
 * (73 a thread for 8 rows held 3 blocks an SM and half the DRAM bandwidth
 * at batch 1). */
template <int MR, bool FP8>
static __global__ void __launch_bounds__(256) moe_gemv_k(float *out, int ldo, const void *xv, const float *xs, int xs_ld,
							 const int32_t *row_src, const int32_t *off, const int32_t *cnt,
							 const int32_t *act, const void *const *wp, const float *const *sp,
							 int sld, int N, int K)
{
	if ((int)blockIdx.y >= act[0])
		return;
	const int x = act[1 + blockIdx.y], n = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
	const int c = cnt[x];
	if (n >= N || c == 0)
		return;
	const int r0 = off[x];
	for (int c0 = 0; c0 < c; c0 += MR) {
		const int m = min(MR, c - c0);
		int src[MR];
#pragma unroll
		for (int i = 0; i < MR; i++)
			src[i] = i < m ? (row_src ? row_src[r0 + c0 + i] : r0 + c0 + i) : 0;
		float acc[MR];
#pragma unroll
		for (int i = 0; i < MR; i++)
			acc[i] = 0;
		if (FP8) {
			const uint8_t *w = (const uint8_t *)wp[x] + (size_t)n * K;
			const float *wsr = sp[x] + (size_t)(n / 128) * sld;
			const uint8_t *xb = (const uint8_t *)xv;
			for (int k0 = lane * 16; k0 < K; k0 += 2 * 512) {
			uint4 wv[2];
#pragma unroll
			for (int u = 0; u < 2; u++)
				wv[u] = k0 + u * 512 < K ? *(const uint4 *)(w + k0 + u * 512) : make_uint4(0, 0, 0, 0);
#pragma unroll
			for (int u = 0; u < 2; u++) {
				const int k = k0 + u * 512;
				if (k >= K)
					break;
				const uint8_t *wb = (const uint8_t *)&wv[u];
				float wf[16];
#pragma unroll
				for (int i = 0; i < 16; i++) {
					__nv_fp8_e4m3 f;
					f.__x = wb[i];
					wf[i] = (float)f;
				}
				const float sw = wsr[k / 128];
#pragma unroll
				for (int i = 0; i < MR; i++) {
					if (i < m) {
						const uint4 xq = *(const uint4 *)(xb + (size_t)src[i] * K + k);
						const uint8_t *q = (const uint8_t *)&xq;
						float d = 0;
#pragma unroll
						for (int j = 0; j < 16; j++) {
							__nv_fp8_e4m3 f;
							f.__x = q[j];
							d += wf[j] * (float)f;
						}
						acc[i] += d * sw * xs[(size_t)(k / 128) * xs_ld + src[i]];
					}
				}
			}
			}
		} else {
			const dsk_bf16 *w = (const dsk_bf16 *)wp[x] + (size_t)n * K;
			const dsk_bf16 *xb = (const dsk_bf16 *)xv;
			for (int k0 = lane * 8; k0 < K; k0 += 2 * 256) {
			uint4 wv[2];
#pragma unroll
			for (int u = 0; u < 2; u++)
				wv[u] = k0 + u * 256 < K ? *(const uint4 *)(w + k0 + u * 256) : make_uint4(0, 0, 0, 0);
#pragma unroll
			for (int u = 0; u < 2; u++) {
				const int k = k0 + u * 256;
				if (k >= K)
					break;
				const __nv_bfloat162 *w2 = (const __nv_bfloat162 *)&wv[u];
				float2 wf[4];
#pragma unroll
				for (int j = 0; j < 4; j++)
					wf[j] = __bfloat1622float2(w2[j]);
#pragma unroll
				for (int i = 0; i < MR; i++) {
					if (i < m) {
						const uint4 xq = *(const uint4 *)(xb + (size_t)src[i] * K + k);
						const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)&xq;
#pragma unroll
						for (int j = 0; j < 4; j++) {
							const float2 xf = __bfloat1622float2(x2[j]);
							acc[i] += wf[j].x * xf.x + wf[j].y * xf.y;
						}
					}
				}
			}
			}
		}
#pragma unroll
		for (int i = 0; i < MR; i++) {
			float v = acc[i];
			for (int o = 16; o; o >>= 1)
				v += __shfl_xor_sync(0xffffffffu, v, o);
			if (lane == 0 && i < m)
				out[(size_t)(r0 + c0 + i) * ldo + n] = v;
		}
	}
}

extern "C" int dsk_moe_gemv(float *out, int ldo, const void *x, const float *xs, int xs_ld, const int32_t *row_src,
			    const int32_t *off, const int32_t *cnt, const int32_t *act, int max_active, int max_rows,
			    const void *const *wp,
			    const float *const *sp, int sld, int fp8, int N, int K, dsk_stream s, ds_err *e)
{
	if (K % (fp8 ? 128 : 8))
		return ds_errf(e, -EINVAL, "moe_gemv: K=%d", K);
	dim3 grid((N + 7) / 8, max_active);
#define MOE_GEMV(mr)                                                                                                \
	do {                                                                                                        \
		if (fp8)                                                                                            \
			moe_gemv_k<mr, true><<<grid, 256, 0, s>>>(out, ldo, x, xs, xs_ld, row_src, off, cnt, act, wp, sp,  \
								   sld, N, K);                                     \
		else                                                                                                \
			moe_gemv_k<mr, false><<<grid, 256, 0, s>>>(out, ldo, x, xs, xs_ld, row_src, off, cnt, act, wp, sp, \
								    sld, N, K);                                    \
	} while (0)
	if (max_rows <= 1)
		MOE_GEMV(1);
	else if (max_rows <= 2)
		MOE_GEMV(2);
	else if (max_rows <= 4)
		MOE_GEMV(4);
	else
		MOE_GEMV(8);
#undef MOE_GEMV
	return dsk_check(e, "moe_gemv");
}
