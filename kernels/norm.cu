/* norm.cu — embedding, RMSNorm with the residual add, row gather. */
#include <cuda_runtime.h>
#include <errno.h>

#include "kernels/norm.h"
#include "kernels/fp8q.cuh"
#include "kernels/launch.cuh"

static __global__ void embed_k(float *x, const dsk_bf16 *emb, const int32_t *tok, int dim)
{
	dsk_pdl_enter();
	const int t = blockIdx.x;
	const dsk_bf16 *src = emb + (size_t)tok[t] * dim;
	for (int i = threadIdx.x; i < dim; i += blockDim.x)
		x[(size_t)t * dim + i] = __bfloat162float(src[i]);
}

extern "C" int dsk_embed(float *x, const dsk_bf16 *emb, const int32_t *tok, int T, int dim, dsk_stream s, ds_err *e)
{
	if (T <= 0)
		return 0;
	dsk_launch(embed_k, T, 256, 0, s, x, emb, tok, dim);
	return dsk_check(e, "embed");
}

static __device__ float block_sum(float v, float *red)
{
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	const int w = threadIdx.x / 32, l = threadIdx.x & 31, nw = blockDim.x / 32;
	__syncthreads();
	if (l == 0)
		red[w] = v;
	__syncthreads();
	v = l < nw ? red[l] : 0.0f;
	for (int o = 16; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

/* Row elements a thread holds (blocks of up to 1024 threads). */
#define NORM_NPT (DSK_NORM_MAX_DIM / 1024)
#define NORM_MAX_K DSK_NORM_MAX_K

/* One block per row t: x[t] += y[t] (add), or x[t] += shared[t] + sum_k
 * wk[t][k] yp[pos[t][k]] (COMB: the MoE combine); then the RMSNorm of x[t]
 * to bf16 ob (and float of, and the FP8 copy q / qs[kb * ld + t]). A kernel
 * on the decode path's critical chain, so it is built for latency: the norm
 * weights load before the wait for the previous kernel, the row stays in
 * registers (one round trip for x, y and the combine's operands, then the
 * expert rows: KU experts' loads in flight at once, which blocks of at most
 * MAXT = 256 threads have the registers for; one expert's rows a round
 * trip, the kernel took 8.5 us at V2-Lite's batch 1, ncu), and the FP8
 * groups read the normed row from shared memory. Float operations in the
 * order of the unfused dsk_moe_combine + RMSNorm. */
template <bool COMB, int MAXT>
static __global__ void __launch_bounds__(MAXT) norm_k(float *__restrict__ x, const float *__restrict__ y,
						      const float *__restrict__ yp, const int32_t *__restrict__ pos,
						      const float *__restrict__ wk, int K, const float *__restrict__ w,
						      int dim, float eps, dsk_bf16 *__restrict__ ob, int ldo,
						      float *__restrict__ of, uint8_t *__restrict__ q,
						      float *__restrict__ qs, int ld)
{
	enum { KU = MAXT <= 256 ? 8 : 2 };
	extern __shared__ float qrow[]; /* [dim] when q */
	__shared__ float red[32], swk[NORM_MAX_K];
	__shared__ int spk[NORM_MAX_K];
	const int t = blockIdx.x, nt = blockDim.x, tid = threadIdx.x;
	float wv[NORM_NPT], v[NORM_NPT], a[NORM_NPT];
#pragma unroll
	for (int j = 0; j < NORM_NPT; j++)
		wv[j] = tid + j * nt < dim ? w[tid + j * nt] : 0.0f;
	dsk_pdl_enter();
	float *xr = x + (size_t)t * dim;
	if (COMB && tid < K) {
		spk[tid] = pos[(size_t)t * K + tid];
		swk[tid] = wk[(size_t)t * K + tid];
	}
#pragma unroll
	for (int j = 0; j < NORM_NPT; j++) {
		const int i = tid + j * nt;
		v[j] = i < dim ? xr[i] : 0.0f;
		a[j] = i < dim && y ? y[(size_t)t * dim + i] : 0.0f;
	}
	if (COMB) {
		__syncthreads();
		for (int k0 = 0; k0 < K; k0 += KU) {
			float r[KU][NORM_NPT];
#pragma unroll
			for (int k = 0; k < KU; k++)
#pragma unroll
				for (int j = 0; j < NORM_NPT; j++)
					r[k][j] = k0 + k < K && tid + j * nt < dim
							  ? yp[(size_t)spk[k0 + k] * dim + tid + j * nt] : 0.0f;
#pragma unroll
			for (int k = 0; k < KU; k++)
				if (k0 + k < K)
#pragma unroll
					for (int j = 0; j < NORM_NPT; j++)
						if (tid + j * nt < dim)
							a[j] += swk[k0 + k] * r[k][j];
		}
	}
	float ss = 0;
#pragma unroll
	for (int j = 0; j < NORM_NPT; j++) {
		const int i = tid + j * nt;
		if (i < dim) {
			if (COMB || y) {
				v[j] += a[j];
				xr[i] = v[j];
			}
			ss += v[j] * v[j];
		}
	}
	ss = block_sum(ss, red);
	const float inv = (float)(1.0 / sqrt((double)ss / dim + eps));
	dsk_bf16 *orow = ob + (size_t)t * ldo;
#pragma unroll
	for (int j = 0; j < NORM_NPT; j++) {
		const int i = tid + j * nt;
		if (i < dim) {
			const float o = wv[j] * (v[j] * inv);
			const dsk_bf16 bo = __float2bfloat16(o);
			orow[i] = bo;
			if (of)
				of[(size_t)t * dim + i] = o;
			if (q)
				qrow[i] = __bfloat162float(bo);
		}
	}
	if (!q)
		return;
	__syncthreads();
	const int lane = tid & 31;
	uint8_t *qr = q + (size_t)t * dim;
	for (int kb = tid / 32; kb < dim / 128; kb += nt / 32) {
		const int i0 = kb * 128 + lane * 4;
		const float g[4] = { qrow[i0], qrow[i0 + 1], qrow[i0 + 2], qrow[i0 + 3] };
		const float sc = dsk_fp8_group<4>(g, qr + i0);
		if (lane == 0)
			qs[(size_t)kb * ld + t] = sc;
	}
}

static int norm_launch(int comb, float *x, const float *y, const float *yp, const int32_t *pos, const float *wk,
		       int K, const float *w, int T, int dim, float eps, dsk_bf16 *ob, int ldo, float *of,
		       const dsk_qout *qo, dsk_stream s, ds_err *e)
{
	if (T <= 0)
		return 0;
	/* As few threads as hold the row: the block becomes resident early
	 * (kernels/launch.cuh) and holds its registers beside the kernel it
	 * waits for. */
	int nt = 128;
	while (nt < 1024 && nt * NORM_NPT < dim)
		nt *= 2;
	if (dim > NORM_NPT * nt || (comb && (K < 0 || K > NORM_MAX_K)))
		return ds_errf(e, -EINVAL, "rmsnorm: rows of %d (at most %d), %d experts a token (at most %d)", dim,
			       DSK_NORM_MAX_DIM, K, NORM_MAX_K);
	if (qo && dim % 128)
		return ds_errf(e, -EINVAL, "fp8 quantization: K=%d is not a multiple of 128", dim);
	uint8_t *q = qo ? qo->q : NULL;
	float *qs = qo ? qo->s : NULL;
	const int ld = qo ? qo->ld : 0;
	const size_t smem = qo ? sizeof(float) * (size_t)dim : 0;
#define NORM_LAUNCH(c, m) \
	dsk_launch(norm_k<c, m>, T, nt, smem, s, x, y, yp, pos, wk, K, w, dim, eps, ob, ldo, of, q, qs, ld)
	/* Decode-sized steps: blocks of up to 256 threads, whose registers let
	 * the combine's loads fly together; many rows (prefill): the 64-register
	 * kernel, more blocks an SM (the same sums). */
	if (nt <= 256 && T <= 64)
		comb ? NORM_LAUNCH(true, 256) : NORM_LAUNCH(false, 256);
	else
		comb ? NORM_LAUNCH(true, 1024) : NORM_LAUNCH(false, 1024);
#undef NORM_LAUNCH
	return dsk_check(e, comb ? "combine_add_rmsnorm" : "add_rmsnorm");
}

extern "C" int dsk_combine_add_rmsnorm(float *x, const float *shared, const float *yp, const int32_t *pos,
				       const float *wk, int K, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
				       int ldo, float *of, const dsk_qout *qo, dsk_stream s, ds_err *e)
{
	return norm_launch(1, x, shared, yp, pos, wk, K, w, T, dim, eps, ob, ldo, of, qo, s, e);
}

extern "C" int dsk_add_rmsnorm(float *x, const float *y, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
			       int ldo, float *of, const dsk_qout *qo, dsk_stream s, ds_err *e)
{
	return norm_launch(0, x, y, NULL, NULL, NULL, 0, w, T, dim, eps, ob, ldo, of, qo, s, e);
}

static __global__ void gather_k(dsk_bf16 *out, const dsk_bf16 *in, const int32_t *idx, int dim)
{
	dsk_pdl_enter();
	const int i = blockIdx.x;
	const dsk_bf16 *src = in + (size_t)idx[i] * dim;
	for (int c = threadIdx.x; c < dim; c += blockDim.x)
		out[(size_t)i * dim + c] = src[c];
}

extern "C" int dsk_gather_rows(dsk_bf16 *out, const dsk_bf16 *in, const int32_t *idx, int n, int dim, dsk_stream s,
			       ds_err *e)
{
	if (n <= 0)
		return 0;
	dsk_launch(gather_k, n, 256, 0, s, out, in, idx, dim);
	return dsk_check(e, "gather_rows");
}
