/* gemv.cu — weight-streaming GEMVs (see gemv.h). Each warp's lanes cover
 * its weight row in 16-byte vectors, U of them in flight (a whole bf16 row
 * of 2048 at once for one or two activation rows: the kernels are short and
 * the latency of each round of loads is what they wait on); the activation
 * rows come through L1. Hinting the weight rows into L2 before waiting for
 * the previous kernel (kernels/launch.cuh) measured no gain (4-layer
 * V2-Lite, batch 1: 0.70 ms either way) and was dropped. */
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels/gemv.h"
#include "kernels/launch.cuh"
#include "kernels/mma.cuh"

#if DSK_GEMV_MAX_M > 16
#error "the tensor-core GEMV takes at most two n8 tiles of tokens"
#endif


static __device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* The dot product of each lane group's 64 e4m3 weights (4 lanes x 16) with
 * the activations beside them, on the tensor cores: the warp's 512 bytes
 * are an m16n8k32 A operand as loaded (lane (g, q) holds rows g and g + 8),
 * and column n of B carries the activations matching row n (n < 8: the
 * lane's bytes 0-3 and 8-11; a second product takes rows 8-15 with bytes
 * 4-7 and 12-15). Row g's sum sits on the diagonal, in lane 4g + g/2, whose
 * own 16 bytes share that 128-block's scales; the other lanes return 0. The
 * products of e4m3 values are exact and summed in float32, as the per-element
 * conversions this replaces did (which ran at a third of the bandwidth). */
static __device__ __forceinline__ float fp8_dot_mma(uint4 w, uint4 x, int lane)
{
	float c[4] = { 0, 0, 0, 0 }, d[4] = { 0, 0, 0, 0 };
	dsk_mma_e4m3(c, w.x, w.y, w.z, w.w, x.x, x.z);
	dsk_mma_e4m3(d, w.x, w.y, w.z, w.w, x.y, x.w);
	const int g = lane >> 2;
	if ((lane & 3) != (g >> 1))
		return 0.0f;
	return (g & 1) ? c[1] + d[3] : c[0] + d[2];
}

/* The weight vectors of dot_rows' first pass: a kernel can load them
 * before it waits for the one before it (weights are never written), so
 * they stream while that one finishes. */
template <int U, bool FP8, int NR>
static __device__ __forceinline__ void first_pass(uint4 (&wv)[NR][U], const char *const *wrow, int K, int lane)
{
#pragma unroll
	for (int r = 0; r < NR; r++)
#pragma unroll
		for (int u = 0; u < U; u++) {
			const int k = FP8 ? lane * 16 + u * 512 : lane * 8 + u * 256;
			wv[r][u] = k < K ? *(const uint4 *)(wrow[r] + (FP8 ? k : 2 * k)) : make_uint4(0, 0, 0, 0);
		}
}

/* acc[r][i] += W_r row . x row src[i], for r < NR weight rows (a gate and
 * an up row share the activation loads) and i < m <= MR; PRE: K is one
 * pass and its weights are in pre (first_pass). */
template <int MR, int U, bool FP8, int NR, bool PRE = false>
static __device__ __forceinline__ void dot_rows(float (*acc)[MR], const char *const *wrow, const float *const *wsr,
						const void *xv, const float *xs, int xs_ld, const int *src, int m, int K,
						int lane, const uint4 (*pre)[U] = NULL)
{
	if (FP8) {
		/* 16 fp8 a lane; 8 lanes cover one 128-wide scale block. The loop
		 * bounds are the warp's (the tensor-core dot needs all lanes). */
		const uint8_t *xb = (const uint8_t *)xv;
		for (int kb = 0; kb < K; kb += U * 512) {
			const int k0 = kb + lane * 16;
			uint4 wv[NR][U];
#pragma unroll
			for (int r = 0; r < NR; r++)
#pragma unroll
				for (int u = 0; u < U; u++)
					wv[r][u] = PRE ? pre[r][u]
					: k0 + u * 512 < K ? *(const uint4 *)(wrow[r] + k0 + u * 512)
							   : make_uint4(0, 0, 0, 0);
			/* With few activation rows their loads and the scales go out
			 * with the weights': one round trip a pass, not one per u. */
			enum { HX = MR <= 2 ? MR : 1, HU = MR <= 2 ? U : 1 };
			uint4 xh[HX][HU];
			float xsh[HX][HU], swh[NR][HU];
			if (MR <= 2) {
#pragma unroll
				for (int u = 0; u < HU; u++) {
					const int k = k0 + u * 512;
					const bool in = k < K;
#pragma unroll
					for (int r = 0; r < NR; r++)
						swh[r][u] = in ? wsr[r][k / 128] : 0.0f;
#pragma unroll
					for (int i = 0; i < HX; i++) {
						xh[i][u] = in && i < m ? *(const uint4 *)(xb + (size_t)src[i] * K + k)
								       : make_uint4(0, 0, 0, 0);
						xsh[i][u] = in && i < m ? xs[(size_t)(k / 128) * xs_ld + src[i]] : 0.0f;
					}
				}
			}
#pragma unroll
			for (int u = 0; u < U; u++) {
				if (kb + u * 512 >= K)
					break;
				const int k = k0 + u * 512;
				const bool in = k < K; /* a lane group's 128-block is all in or all out */
				float sw[NR];
#pragma unroll
				for (int r = 0; r < NR; r++)
					sw[r] = MR <= 2 ? swh[r][MR <= 2 ? u : 0] : in ? wsr[r][k / 128] : 0.0f;
#pragma unroll
				for (int i = 0; i < MR; i++) {
					if (i < m) {
						uint4 xq;
						float xsc;
						if (MR <= 2) {
							xq = xh[i < HX ? i : 0][MR <= 2 ? u : 0];
							xsc = xsh[i < HX ? i : 0][MR <= 2 ? u : 0];
						} else {
							xq = in ? *(const uint4 *)(xb + (size_t)src[i] * K + k) : make_uint4(0, 0, 0, 0);
							xsc = in ? xs[(size_t)(k / 128) * xs_ld + src[i]] : 0.0f;
						}
#pragma unroll
						for (int r = 0; r < NR; r++)
							acc[r][i] += fp8_dot_mma(wv[r][u], xq, lane) * sw[r] * xsc;
					}
				}
			}
		}
	} else {
		const dsk_bf16 *xb = (const dsk_bf16 *)xv;
		for (int k0 = lane * 8; k0 < K; k0 += U * 256) {
			uint4 wv[NR][U];
#pragma unroll
			for (int r = 0; r < NR; r++)
#pragma unroll
				for (int u = 0; u < U; u++)
					wv[r][u] = PRE ? pre[r][u]
					: k0 + u * 256 < K ? *(const uint4 *)(wrow[r] + 2 * (k0 + u * 256))
							   : make_uint4(0, 0, 0, 0);
#pragma unroll
			for (int u = 0; u < U; u++) {
				const int k = k0 + u * 256;
				if (k >= K)
					break;
				float2 wf[NR][4];
#pragma unroll
				for (int r = 0; r < NR; r++)
#pragma unroll
					for (int j = 0; j < 4; j++)
						wf[r][j] = __bfloat1622float2(((const __nv_bfloat162 *)&wv[r][u])[j]);
#pragma unroll
				for (int i = 0; i < MR; i++) {
					if (i < m) {
						const uint4 xq = *(const uint4 *)(xb + (size_t)src[i] * K + k);
						const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)&xq;
#pragma unroll
						for (int j = 0; j < 4; j++) {
							const float2 xf = __bfloat1622float2(x2[j]);
#pragma unroll
							for (int r = 0; r < NR; r++)
								acc[r][i] += wf[r][j].x * xf.x + wf[r][j].y * xf.y;
						}
					}
				}
			}
		}
	}
}

template <int MR>
static __device__ __forceinline__ void warp_sum(float *acc)
{
#pragma unroll
	for (int i = 0; i < MR; i++)
		for (int o = 16; o; o >>= 1)
			acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
}

typedef struct {
	dsk_gemv_job j[2];
	int nb0; /* blocks of job 0 (the rest are job 1's) */
	const void *x;
	const float *xs;
	int Mp, K;
} dense_args;

/* 16-byte loads a lane keeps in flight: a row in one or two rounds where
 * registers allow (bf16 rows of 2048 are 8 loads a lane). */
template <int MR, bool FP8>
struct unroll {
	enum { U = MR > 2 ? 2 : FP8 ? 4 : 8 };
};

/* A gate and an up row (GLU) in bf16 for 1-2 rows: half a row a round
 * each, as moe_unroll (its registers let three blocks reside; no preload is
 * lost, preload() leaves GLU out): 27-layer V2-Lite on an H200, batch 1
 * 2.504 -> 2.478 ms, batch 2 (4-layer) 0.629 -> 0.615. The single rows
 * keep whole-row rounds: they preload before the wait, which halving them
 * would give up (batch 1 2.504 -> 2.593 ms). */
template <int MR, bool FP8, bool GLU>
struct dense_unroll {
	enum { U = GLU && !FP8 && MR <= 2 ? 4 : unroll<MR, FP8>::U };
};

/* PRE: K is one pass (as V2-Lite's and V3's 2048-7168-wide rows of bf16
 * up to 2048, FP8 up to 2048): its weights load before the wait for the
 * previous kernel. Longer rows would hold a second pass's registers. */
template <int M, bool FP8, bool GLU, bool PRE>
static __global__ void __launch_bounds__(256) gemv_k(dense_args a)
{
	const int lane = threadIdx.x & 31, wb = FP8 ? 1 : 2;
	/* Fields picked by value: indexing the parameter array by a runtime
	 * value would copy it to local memory in every thread. */
	const bool second = !GLU && (int)blockIdx.x >= a.nb0;
	const int N = second ? a.j[1].N : a.j[0].N, sld = second ? a.j[1].sld : a.j[0].sld;
	const char *w = (const char *)(second ? a.j[1].w : a.j[0].w);
	const float *ws = second ? a.j[1].ws : a.j[0].ws;
	const int n = ((int)blockIdx.x - (second ? a.nb0 : 0)) * 8 + threadIdx.x / 32;
	if (n >= N)
		return;
	const size_t row = (size_t)n * a.K * wb;
	const char *rows[2] = { w + row, GLU ? (const char *)a.j[1].w + row : NULL };
	enum { U = dense_unroll<M, FP8, GLU>::U, NR = GLU ? 2 : 1 };
	uint4 pre[NR][PRE ? U : 1];
	if (PRE)
		first_pass<PRE ? U : 1, FP8, NR>(pre, rows, a.K, lane);
	dsk_pdl_enter();
	int src[M];
#pragma unroll
	for (int i = 0; i < M; i++)
		src[i] = i;
	float acc[2][M];
#pragma unroll
	for (int i = 0; i < M; i++)
		acc[0][i] = acc[1][i] = 0;
	const float *sr[2] = { FP8 ? ws + (size_t)(n / 128) * sld : NULL,
			       FP8 && GLU ? a.j[1].ws + (size_t)(n / 128) * a.j[1].sld : NULL };
	if (PRE)
		dot_rows<M, PRE ? U : 1, FP8, NR, true>(acc, rows, sr, a.x, a.xs, a.Mp, src, M, a.K, lane, pre);
	else
		dot_rows<M, U, FP8, NR>(acc, rows, sr, a.x, a.xs, a.Mp, src, M, a.K, lane);
	warp_sum<M>(acc[0]);
	if (GLU)
		warp_sum<M>(acc[1]);
	if (lane == 0) {
		if (GLU) {
#pragma unroll
			for (int i = 0; i < M; i++)
				((dsk_bf16 *)a.j[0].out)[(size_t)i * a.j[0].ldo + n] =
					__float2bfloat16(silu_mul(acc[0][i], acc[1][i]));
		} else {
			float *out = (float *)(second ? a.j[1].out : a.j[0].out);
			const int ldo = second ? a.j[1].ldo : a.j[0].ldo;
#pragma unroll
			for (int i = 0; i < M; i++)
				out[(size_t)i * ldo + n] = acc[0][i];
		}
	}
}

/* Where gemv_k loads its weights before the wait: one pass, and no fewer
 * blocks resident for it (bf16 rows held for two activation rows or a
 * gate and an up row took 90-150 registers against 58-95). */
static bool preload(int m, bool fp8, bool glu)
{
#ifdef DSK_GEMV_NO_PRELOAD
	return false;
#endif
	return fp8 || (m == 1 && !glu);
}

template <bool FP8, bool GLU>
static void dense_launch(int M, const dense_args &a, int blocks, cudaStream_t s)
{
#define GEMV_CASE(m)                                                              \
	case m:                                                                   \
		if (preload(m, FP8, GLU) && a.K <= dense_unroll<m, FP8, GLU>::U * (FP8 ? 512 : 256)) \
			dsk_launch(gemv_k<m, FP8, GLU, true>, blocks, 256, 0, s, a);  \
		else                                                              \
			dsk_launch(gemv_k<m, FP8, GLU, false>, blocks, 256, 0, s, a); \
		break;
	switch (M) {
		GEMV_CASE(1)
		GEMV_CASE(2)
	}
#undef GEMV_CASE
}

/* 3-16 rows: the tensor cores. A warp takes 16 weight rows (lane (g, q)
 * loads 16 bytes of rows g and g + 8) and the activations as the n8 operand
 * of mma (lane (g, q) loads the same 16 bytes of token g's row): a k-order
 * both operands share, so each lane's loads are its own fragment and no
 * shuffle is needed. Per-lane arithmetic no longer grows with the rows, as
 * it did in dot_rows (8 rows ran at 1.1 TB/s, cuBLASLt's 64x8 tiles 1.6).
 * The K range is split over the block's warps (16 rows stream as 8-16
 * warps' loads at once), summed in shared memory in warp order: a token's
 * result does not depend on the other rows of the launch. */
template <bool FP8>
static __device__ __forceinline__ void mma_16x8(float *d, uint4 wg, uint4 wh, uint4 x)
{
	if (FP8) {
		dsk_mma_e4m3(d, wg.x, wh.x, wg.y, wh.y, x.x, x.y);
		dsk_mma_e4m3(d, wg.z, wh.z, wg.w, wh.w, x.z, x.w);
	} else {
		dsk_mma_bf16(d, wg.x, wh.x, wg.y, wh.y, x.x, x.y);
		dsk_mma_bf16(d, wg.z, wh.z, wg.w, wh.w, x.z, x.w);
	}
}

/* 16-byte loads a lane keeps in flight per weight row pair and chunk. */
template <bool GLU>
struct tc_unroll {
	enum { U = GLU ? 2 : 4 };
};
#define TC_WARPS 8

static __device__ __forceinline__ uint4 ld16(const char *p, bool in)
{
	return in ? *(const uint4 *)p : make_uint4(0, 0, 0, 0);
}

/* The chunk loop of one warp: acc[r][t] += W_r rows (n0 + g, n0 + g + 8)
 * . x rows of tokens t * 8 + (g; 2q, 2q + 1) over this warp's K chunks
 * (chunk w, w + S, ...). xrow[t]: the x row of token t * 8 + g, -1 past
 * the tokens; srow[t][2]: those of tokens t * 8 + 2q and + 1 (FP8 scales). */
template <int NT, bool FP8, int NR, int U>
static __device__ __forceinline__ void tc_dot(float (*acc)[NT][4], const char *const *wr, const float *const *sr,
					      bool rg, bool rh, size_t h8, const char *xb, const float *xs, int xs_ld,
					      const int *xrow, const int (*srow)[2], int K, int w, int S, int q)
{
	enum { EB = FP8 ? 1 : 2, EL = 16 / EB, CK = 4 * EL * U };
	for (int kc = w * CK; kc < K; kc += S * CK) {
		uint4 wv[NR][2][U], xv[NT][U];
#pragma unroll
		for (int u = 0; u < U; u++) {
			const int p = kc + u * 4 * EL + q * EL;
			const bool in = p < K;
#pragma unroll
			for (int r = 0; r < NR; r++) {
				wv[r][0][u] = ld16(wr[r] + (size_t)p * EB, in && rg);
				wv[r][1][u] = ld16(wr[r] + h8 + (size_t)p * EB, in && rh);
			}
#pragma unroll
			for (int t = 0; t < NT; t++)
				xv[t][u] = ld16(xb + ((size_t)(xrow[t] < 0 ? 0 : xrow[t]) * K + p) * EB, in && xrow[t] >= 0);
		}
#pragma unroll
		for (int u = 0; u < U; u++) {
			const int k = kc + u * 4 * EL;
			if (k >= K)
				break;
			if (FP8) {
				/* a chunk's 64 columns lie in one 128-column scale block */
				const int kb = k / 128;
#pragma unroll
				for (int r = 0; r < NR; r++) {
					const float sw = sr[r][kb];
#pragma unroll
					for (int t = 0; t < NT; t++) {
						float d[4] = { 0, 0, 0, 0 };
						mma_16x8<true>(d, wv[r][0][u], wv[r][1][u], xv[t][u]);
						const float x0 = srow[t][0] >= 0 ? xs[(size_t)kb * xs_ld + srow[t][0]] * sw : 0.0f;
						const float x1 = srow[t][1] >= 0 ? xs[(size_t)kb * xs_ld + srow[t][1]] * sw : 0.0f;
						acc[r][t][0] += d[0] * x0;
						acc[r][t][1] += d[1] * x1;
						acc[r][t][2] += d[2] * x0;
						acc[r][t][3] += d[3] * x1;
					}
				}
			} else {
#pragma unroll
				for (int r = 0; r < NR; r++)
#pragma unroll
					for (int t = 0; t < NT; t++)
						mma_16x8<false>(acc[r][t], wv[r][0][u], wv[r][1][u], xv[t][u]);
			}
		}
	}
}

/* Sums the block's warps' acc (n floats a lane) into warp 0's, in warp
 * order; true in warp 0. The caller syncs before red is written again. */
template <int n>
static __device__ __forceinline__ bool tc_reduce(float *acc, float (*red)[32][n], int w, int S, int lane)
{
	if (w > 0)
#pragma unroll
		for (int i = 0; i < n; i++)
			red[w - 1][lane][i] = acc[i];
	__syncthreads();
	if (w > 0)
		return false;
	for (int s = 1; s < S; s++)
#pragma unroll
		for (int i = 0; i < n; i++)
			acc[i] += red[s - 1][lane][i];
	return true;
}

/* acc fragment i of token tile t: token t * 8 + 2q + (i & 1), weight row
 * n0 + g + 8 (i >> 1). */
static __device__ __forceinline__ int tc_tok(int t, int q, int i) { return t * 8 + 2 * q + (i & 1); }
static __device__ __forceinline__ int tc_row(int n0, int g, int i) { return n0 + g + (i >> 1) * 8; }

/* NT n8 tiles of tokens (M <= 8 NT); blockDim.x / 32 warps split K. */
template <int NT, bool FP8, bool GLU>
static __global__ void __launch_bounds__(32 * TC_WARPS) gemv_tc_k(dense_args a, int M)
{
	enum { NR = GLU ? 2 : 1, EB = FP8 ? 1 : 2 };
	__shared__ float red[TC_WARPS - 1][32][NR * NT * 4];
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, S = blockDim.x >> 5, g = lane >> 2, q = lane & 3;
	const bool second = !GLU && (int)blockIdx.x >= a.nb0;
	const int N = second ? a.j[1].N : a.j[0].N, K = a.K;
	const int n0 = ((int)blockIdx.x - (second ? a.nb0 : 0)) * 16;
	const char *wr[NR];
	const float *sr[NR];
	wr[0] = (const char *)(second ? a.j[1].w : a.j[0].w) + (size_t)(n0 + g) * K * EB;
	sr[0] = FP8 ? (second ? a.j[1].ws : a.j[0].ws) + (size_t)(n0 / 128) * (second ? a.j[1].sld : a.j[0].sld) : NULL;
	if (GLU) {
		wr[NR - 1] = (const char *)a.j[1].w + (size_t)(n0 + g) * K * EB;
		sr[NR - 1] = FP8 ? a.j[1].ws + (size_t)(n0 / 128) * a.j[1].sld : NULL;
	}
	int xrow[NT], srow[NT][2];
#pragma unroll
	for (int t = 0; t < NT; t++) {
		xrow[t] = t * 8 + g < M ? t * 8 + g : -1;
		srow[t][0] = t * 8 + 2 * q < M ? t * 8 + 2 * q : -1;
		srow[t][1] = t * 8 + 2 * q + 1 < M ? t * 8 + 2 * q + 1 : -1;
	}
	float acc[NR][NT][4] = {};
	dsk_pdl_enter();
	tc_dot<NT, FP8, NR, tc_unroll<GLU>::U>(acc, wr, sr, n0 + g < N, n0 + g + 8 < N, (size_t)8 * K * EB,
						(const char *)a.x, a.xs, a.Mp, xrow, srow, K, w, S, q);
	if (!tc_reduce<NR * NT * 4>(&acc[0][0][0], red, w, S, lane))
		return;
#pragma unroll
	for (int t = 0; t < NT; t++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			const int m = tc_tok(t, q, i), n = tc_row(n0, g, i);
			if (m >= M || n >= N)
				continue;
			if (GLU) {
				((dsk_bf16 *)a.j[0].out)[(size_t)m * a.j[0].ldo + n] =
					__float2bfloat16(silu_mul(acc[0][t][i], acc[NR - 1][t][i]));
			} else {
				float *out = (float *)(second ? a.j[1].out : a.j[0].out);
				out[(size_t)m * (second ? a.j[1].ldo : a.j[0].ldo) + n] = acc[0][t][i];
			}
		}
}

/* Warps a tensor-core block splits K over: about two chunks each. */
static int tc_warps(int K, int fp8, int glu)
{
	const int ck = (fp8 ? 64 : 32) * (glu ? (int)tc_unroll<true>::U : (int)tc_unroll<false>::U);
	const int chunks = (K + ck - 1) / ck;
	return chunks >= 2 * TC_WARPS ? TC_WARPS : (chunks + 1) / 2;
}

template <bool FP8, bool GLU>
static void tc_launch(int M, const dense_args &a, int blocks, int warps, cudaStream_t s)
{
	if (M <= 8)
		dsk_launch(gemv_tc_k<1, FP8, GLU>, blocks, 32 * warps, 0, s, a, M);
	else
		dsk_launch(gemv_tc_k<2, FP8, GLU>, blocks, 32 * warps, 0, s, a, M);
}

extern "C" int dsk_gemv(const dsk_gemv_job *jobs, int njobs, int glu, const void *x, const float *xs, int M, int Mp,
			int K, int fp8, dsk_stream s, ds_err *e)
{
	if (M < 1 || M > DSK_GEMV_MAX_M || njobs < 1 || njobs > 2 || (glu && (njobs != 2 || jobs[0].N != jobs[1].N)) ||
	    K % (fp8 ? 128 : 8))
		return ds_errf(e, -EINVAL, "gemv: %d rows, %d weights, K=%d unsupported", M, njobs, K);
	dense_args a = {};
	a.j[0] = jobs[0];
	a.j[1] = njobs > 1 ? jobs[1] : jobs[0];
	a.nb0 = (jobs[0].N + 7) / 8;
	a.x = x;
	a.xs = xs;
	a.Mp = Mp;
	a.K = K;
	if (M > 2) {
		/* 16 rows a block */
		a.nb0 = (jobs[0].N + 15) / 16;
		const int blocks = glu ? a.nb0 : a.nb0 + (njobs > 1 ? (jobs[1].N + 15) / 16 : 0);
		const int warps = tc_warps(K, fp8, glu);
		if (fp8)
			glu ? tc_launch<true, true>(M, a, blocks, warps, s) : tc_launch<true, false>(M, a, blocks, warps, s);
		else
			glu ? tc_launch<false, true>(M, a, blocks, warps, s)
			    : tc_launch<false, false>(M, a, blocks, warps, s);
		return dsk_check(e, "gemv");
	}
	const int blocks = glu ? a.nb0 : a.nb0 + (njobs > 1 ? (jobs[1].N + 7) / 8 : 0);
	if (fp8)
		glu ? dense_launch<true, true>(M, a, blocks, s) : dense_launch<true, false>(M, a, blocks, s);
	else
		glu ? dense_launch<false, true>(M, a, blocks, s) : dense_launch<false, false>(M, a, blocks, s);
	return dsk_check(e, "gemv");
}

/* 16-byte loads a lane keeps in flight: half a bf16 row of 2048 a round
 * (the whole row took 108 registers, two blocks an SM at 25 % occupancy and
 * 55 % of the DRAM bandwidth (ncu); 70 let three blocks reside, which gains
 * more than the second round costs: 27-layer V2-Lite on an H200, batch 1
 * 2.53 -> 2.49 ms, batch 8 7.01 -> 6.61 with the one-wave grid below,
 * docs/PERFORMANCE.md). */
template <int MR>
struct moe_unroll {
	enum { U = MR > 2 ? 2 : 4 };
};

/* Block (row tile, active expert), for experts of 1-2 rows a pass (more go
 * to moe_tc_k); an expert with more rows takes more passes over its
 * weights. */
template <int MR, bool FP8, bool GLU>
static __global__ void __launch_bounds__(256) moe_gemv_k(dsk_moe_gemv_args a, int R)
{
	dsk_pdl_enter();
	if ((int)blockIdx.y >= a.act[0])
		return;
	const int x = a.act[1 + blockIdx.y], lane = threadIdx.x & 31, c = a.cnt[x], wb = FP8 ? 1 : 2;
	if (c == 0)
		return;
	const int r0 = a.off[x];
	const char *w0 = (const char *)a.wp[0][x], *w1 = (const char *)a.wp[GLU ? 1 : 0][x];
	const float *s0 = FP8 ? a.sp[0][x] : NULL, *s1 = FP8 ? a.sp[GLU ? 1 : 0][x] : NULL;
	/* A warp streams two weight rows at once (the gate and up rows of its
	 * output, or two adjacent outputs), R times: the expert's plan and
	 * pointers are read once, not once a row tile. */
	for (int rr = 0; rr < R; rr++) {
		const int wr = (blockIdx.x * 8 + threadIdx.x / 32) * R + rr, n = GLU ? wr : 2 * wr;
		if (n >= a.N)
			return;
		const bool two = !GLU && n + 1 < a.N;
		const int n2 = two ? n + 1 : n;
		const char *rows[2] = { w0 + (size_t)n * a.K * wb, w1 + (size_t)n2 * a.K * wb };
		const float *sr[2] = { FP8 ? s0 + (size_t)(n / 128) * a.sld : NULL,
				       FP8 ? s1 + (size_t)(n2 / 128) * a.sld : NULL };
		for (int c0 = 0; c0 < c; c0 += MR) {
			const int m = min(MR, c - c0);
			int src[MR];
#pragma unroll
			for (int i = 0; i < MR; i++)
				src[i] = i < m ? (a.row_src ? a.row_src[r0 + c0 + i] : r0 + c0 + i) : 0;
			float acc[2][MR];
#pragma unroll
			for (int i = 0; i < MR; i++)
				acc[0][i] = acc[1][i] = 0;
			dot_rows<MR, moe_unroll<MR>::U, FP8, 2>(acc, rows, sr, a.x, a.xs, a.xs_ld, src, m, a.K, lane);
			warp_sum<MR>(acc[0]);
			warp_sum<MR>(acc[1]);
#pragma unroll
			for (int i = 0; i < MR; i++)
				if (lane == 0 && i < m) {
					if (GLU) {
						((dsk_bf16 *)a.out)[(size_t)(r0 + c0 + i) * a.ldo + n] =
							__float2bfloat16(silu_mul(acc[0][i], acc[1][i]));
					} else {
						((float *)a.out)[(size_t)(r0 + c0 + i) * a.ldo + n] = acc[0][i];
						if (two)
							((float *)a.out)[(size_t)(r0 + c0 + i) * a.ldo + n + 1] = acc[1][i];
					}
				}
		}
	}
}

/* Routed experts of more than 2 rows a pass on the tensor cores: block
 * (16-row tile, active expert), the expert's rows 8 NT at a time. */
template <int NT, bool FP8, bool GLU>
static __global__ void __launch_bounds__(32 * TC_WARPS) moe_tc_k(dsk_moe_gemv_args a)
{
	enum { NR = GLU ? 2 : 1, EB = FP8 ? 1 : 2 };
	__shared__ float red[TC_WARPS - 1][32][NR * NT * 4];
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, S = blockDim.x >> 5, g = lane >> 2, q = lane & 3;
	dsk_pdl_enter();
	if ((int)blockIdx.y >= a.act[0])
		return;
	const int x = a.act[1 + blockIdx.y], c = a.cnt[x], r0 = a.off[x], n0 = blockIdx.x * 16, N = a.N, K = a.K;
	const char *wr[NR];
	const float *sr[NR];
#pragma unroll
	for (int r = 0; r < NR; r++) {
		wr[r] = (const char *)a.wp[r][x] + (size_t)(n0 + g) * K * EB;
		sr[r] = FP8 ? a.sp[r][x] + (size_t)(n0 / 128) * a.sld : NULL;
	}
	for (int c0 = 0; c0 < c; c0 += 8 * NT) {
		int xrow[NT], srow[NT][2];
#pragma unroll
		for (int t = 0; t < NT; t++) {
			const int i = c0 + t * 8 + g, j = c0 + t * 8 + 2 * q;
			xrow[t] = i < c ? (a.row_src ? a.row_src[r0 + i] : r0 + i) : -1;
			srow[t][0] = j < c ? (a.row_src ? a.row_src[r0 + j] : r0 + j) : -1;
			srow[t][1] = j + 1 < c ? (a.row_src ? a.row_src[r0 + j + 1] : r0 + j + 1) : -1;
		}
		float acc[NR][NT][4] = {};
		tc_dot<NT, FP8, NR, tc_unroll<GLU>::U>(acc, wr, sr, n0 + g < N, n0 + g + 8 < N, (size_t)8 * K * EB,
							(const char *)a.x, a.xs, a.xs_ld, xrow, srow, K, w, S, q);
		if (tc_reduce<NR * NT * 4>(&acc[0][0][0], red, w, S, lane)) {
#pragma unroll
			for (int t = 0; t < NT; t++)
#pragma unroll
				for (int i = 0; i < 4; i++) {
					const int m = c0 + tc_tok(t, q, i), n = tc_row(n0, g, i);
					if (m >= c || n >= N)
						continue;
					if (GLU)
						((dsk_bf16 *)a.out)[(size_t)(r0 + m) * a.ldo + n] =
							__float2bfloat16(silu_mul(acc[0][t][i], acc[NR - 1][t][i]));
					else
						((float *)a.out)[(size_t)(r0 + m) * a.ldo + n] = acc[0][t][i];
				}
		}
		__syncthreads(); /* red is written again */
	}
}

template <int NT>
static void moe_tc_launch(const dsk_moe_gemv_args *a, cudaStream_t s)
{
	const dim3 grid((a->N + 15) / 16, a->max_active), block(32 * tc_warps(a->K, a->fp8, a->glu));
	if (a->fp8)
		a->glu ? dsk_launch(moe_tc_k<NT, true, true>, grid, block, 0, s, *a)
		       : dsk_launch(moe_tc_k<NT, true, false>, grid, block, 0, s, *a);
	else
		a->glu ? dsk_launch(moe_tc_k<NT, false, true>, grid, block, 0, s, *a)
		       : dsk_launch(moe_tc_k<NT, false, false>, grid, block, 0, s, *a);
}

/* The warp rows (1 or 2 outputs each) a warp takes in turn, R <= 4: as few
 * as let the grid fit the blocks the SMs hold at once (one wave; each
 * block reads its expert's plan once). */
template <int MR, bool FP8, bool GLU>
static void moe_launch1(const dsk_moe_gemv_args *a, int tiles, cudaStream_t s)
{
	static int per;
	if (!per && (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, moe_gemv_k<MR, FP8, GLU>, 256, 0) != cudaSuccess ||
		     per < 1)) {
		cudaGetLastError();
		per = 2;
	}
	const long slots = (long)per * dsk_sm_count();
	int R = (int)(((long)tiles * a->max_active + slots - 1) / slots);
	R = R < 1 ? 1 : R > 4 ? 4 : R;
	dsk_launch(moe_gemv_k<MR, FP8, GLU>, dim3((tiles + R - 1) / R, a->max_active), 256, 0, s, *a, R);
}

template <int MR>
static void moe_launch(const dsk_moe_gemv_args *a, int tiles, cudaStream_t s)
{
	if (a->fp8)
		a->glu ? moe_launch1<MR, true, true>(a, tiles, s) : moe_launch1<MR, true, false>(a, tiles, s);
	else
		a->glu ? moe_launch1<MR, false, true>(a, tiles, s) : moe_launch1<MR, false, false>(a, tiles, s);
}

extern "C" int dsk_moe_gemv(const dsk_moe_gemv_args *a, dsk_stream s, ds_err *e)
{
	if (a->K % (a->fp8 ? 128 : 8))
		return ds_errf(e, -EINVAL, "moe_gemv: K=%d", a->K);
	if (a->max_active <= 0)
		return 0;
	const int rc = dsk_moe_bulk_pick(a) ? dsk_moe_gemv_bulk(a, s, e) : -ENOTSUP;
	if (rc != -ENOTSUP)
		return rc;
	if (a->max_rows > 2) {
		a->max_rows > 8 ? moe_tc_launch<2>(a, s) : moe_tc_launch<1>(a, s);
		return dsk_check(e, "moe_gemv");
	}
	const int wrows = a->glu ? a->N : (a->N + 1) / 2, tiles = (wrows + 7) / 8;
	if (a->max_rows <= 1)
		moe_launch<1>(a, tiles, s);
	else
		moe_launch<2>(a, tiles, s);
	return dsk_check(e, "moe_gemv");
}

template <int U, int T>
static __global__ void __launch_bounds__(256) heads_k(dsk_bf16 *out, const dsk_bf16 *W, long wstride,
						      const dsk_bf16 *x, int nh, int rows, int K)
{
	const int lane = threadIdx.x & 31, r = blockIdx.x * 8 + threadIdx.x / 32;
	if (r >= nh * rows)
		return;
	const int h = r / rows, i = r % rows;
	const dsk_bf16 *wr = W + h * wstride + (size_t)i * K;
	uint4 wv[U];
#pragma unroll
	for (int u = 0; u < U; u++) {
		const int k = lane * 8 + u * 256;
		wv[u] = k < K ? *(const uint4 *)(wr + k) : make_uint4(0, 0, 0, 0);
	}
	dsk_pdl_enter();
	float acc[T];
#pragma unroll
	for (int t = 0; t < T; t++)
		acc[t] = 0;
#pragma unroll
	for (int u = 0; u < U; u++) {
		const int k = lane * 8 + u * 256;
		if (k >= K)
			break;
		const __nv_bfloat162 *w2 = (const __nv_bfloat162 *)&wv[u];
#pragma unroll
		for (int t = 0; t < T; t++) {
			const uint4 xq = *(const uint4 *)(x + ((size_t)t * nh + h) * K + k);
			const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)&xq;
#pragma unroll
			for (int j = 0; j < 4; j++) {
				const float2 wf = __bfloat1622float2(w2[j]), xf = __bfloat1622float2(x2[j]);
				acc[t] += wf.x * xf.x + wf.y * xf.y;
			}
		}
	}
	warp_sum<T>(acc);
	if (lane == 0)
#pragma unroll
		for (int t = 0; t < T; t++)
			out[((size_t)t * nh + h) * rows + i] = __float2bfloat16(acc[t]);
}

extern "C" int dsk_gemv_heads(dsk_bf16 *out, const dsk_bf16 *W, long wstride, const dsk_bf16 *x, int T, int nh,
			      int rows, int K, dsk_stream s, ds_err *e)
{
#ifdef DSK_GEMV_NO_PRELOAD
	return -ENOTSUP;
#endif
	if (T < 1 || T > 2 || K > 8 * 256 || K % 8)
		return -ENOTSUP;
	const int blocks = (nh * rows + 7) / 8;
	if (K <= 2 * 256)
		T == 1 ? dsk_launch(heads_k<2, 1>, blocks, 256, 0, s, out, W, wstride, x, nh, rows, K)
		       : dsk_launch(heads_k<2, 2>, blocks, 256, 0, s, out, W, wstride, x, nh, rows, K);
	else
		T == 1 ? dsk_launch(heads_k<8, 1>, blocks, 256, 0, s, out, W, wstride, x, nh, rows, K)
		       : dsk_launch(heads_k<8, 2>, blocks, 256, 0, s, out, W, wstride, x, nh, rows, K);
	return dsk_check(e, "gemv_heads");
}
