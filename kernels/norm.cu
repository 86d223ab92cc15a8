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

/* Row xr with sum of squares ss: o = w * xr / rms, to bf16 ob (and float of,
 * and the FP8 copy q / s[kb * ld] of row t). The FP8 part recomputes o from
 * xr, which block_sum's barrier made visible, rather than reading ob back
 * (another barrier); each warp then does what quant_k does for a group. */
static __device__ __forceinline__ void norm_out(const float *xr, float ss, const float *w, int dim, float eps,
						dsk_bf16 *ob, float *of, uint8_t *q, float *qs, int ld, int t)
{
	const float inv = (float)(1.0 / sqrt((double)ss / dim + eps));
	for (int i = threadIdx.x; i < dim; i += blockDim.x) {
		float o = w[i] * (xr[i] * inv);
		ob[i] = __float2bfloat16(o);
		if (of)
			of[i] = o;
	}
	if (!q)
		return;
	const int lane = threadIdx.x & 31;
	for (int kb = threadIdx.x / 32; kb < dim / 128; kb += blockDim.x / 32) {
		const int i0 = kb * 128 + lane * 4;
		float v[4];
		for (int i = 0; i < 4; i++)
			v[i] = __bfloat162float(__float2bfloat16(w[i0 + i] * (xr[i0 + i] * inv)));
		const float sc = dsk_fp8_group<4>(v, q + i0);
		if (lane == 0)
			qs[(size_t)kb * ld + t] = sc;
	}
}

static __global__ void add_rmsnorm_k(float *x, const float *y, const float *w, int dim, float eps, dsk_bf16 *ob,
				     int ldo, float *of, uint8_t *q, float *qs, int ld)
{
	__shared__ float red[32];
	dsk_pdl_enter();
	const int t = blockIdx.x;
	float *xr = x + (size_t)t * dim;
	float ss = 0;
	for (int i = threadIdx.x; i < dim; i += blockDim.x) {
		float v = xr[i];
		if (y) {
			v += y[(size_t)t * dim + i];
			xr[i] = v;
		}
		ss += v * v;
	}
	norm_out(xr, block_sum(ss, red), w, dim, eps, ob + (size_t)t * ldo, of ? of + (size_t)t * dim : NULL,
		 q ? q + (size_t)t * dim : NULL, qs, ld, t);
}

/* add_rmsnorm_k with y computed in place as the MoE combine: the same float
 * operations in the same order as dsk_moe_combine then dsk_add_rmsnorm. */
static __global__ void combine_norm_k(float *x, const float *shared, const float *yp, const int32_t *pos,
				      const float *wk, int K, const float *w, int dim, float eps, dsk_bf16 *ob, int ldo,
				      float *of, uint8_t *q, float *qs, int ld)
{
	__shared__ float red[32];
	dsk_pdl_enter();
	const int t = blockIdx.x;
	float *xr = x + (size_t)t * dim;
	float ss = 0;
	for (int i = threadIdx.x; i < dim; i += blockDim.x) {
		float acc = shared ? shared[(size_t)t * dim + i] : 0.0f;
		for (int k = 0; k < K; k++)
			acc += wk[(size_t)t * K + k] * yp[(size_t)pos[(size_t)t * K + k] * dim + i];
		const float v = xr[i] + acc;
		xr[i] = v;
		ss += v * v;
	}
	norm_out(xr, block_sum(ss, red), w, dim, eps, ob + (size_t)t * ldo, of ? of + (size_t)t * dim : NULL,
		 q ? q + (size_t)t * dim : NULL, qs, ld, t);
}

extern "C" int dsk_combine_add_rmsnorm(float *x, const float *shared, const float *yp, const int32_t *pos,
				       const float *wk, int K, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
				       int ldo, float *of, const dsk_qout *qo, dsk_stream s, ds_err *e)
{
	if (T <= 0)
		return 0;
	if (qo && dim % 128)
		return ds_errf(e, -EINVAL, "fp8 quantization: K=%d is not a multiple of 128", dim);
	dsk_launch(combine_norm_k, T, dim >= 1024 ? 1024 : 256, 0, s, x, shared, yp, pos, wk, K, w, dim, eps, ob, ldo,
		   of, qo ? qo->q : (uint8_t *)NULL, qo ? qo->s : (float *)NULL, qo ? qo->ld : 0);
	return dsk_check(e, "combine_add_rmsnorm");
}

extern "C" int dsk_add_rmsnorm(float *x, const float *y, const float *w, int T, int dim, float eps, dsk_bf16 *ob,
			       int ldo, float *of, const dsk_qout *qo, dsk_stream s, ds_err *e)
{
	if (T <= 0)
		return 0;
	if (qo && dim % 128)
		return ds_errf(e, -EINVAL, "fp8 quantization: K=%d is not a multiple of 128", dim);
	dsk_launch(add_rmsnorm_k, T, dim >= 1024 ? 1024 : 256, 0, s, x, y, w, dim, eps, ob, ldo, of,
		   qo ? qo->q : (uint8_t *)NULL, qo ? qo->s : (float *)NULL, qo ? qo->ld : 0);
	return dsk_check(e, "add_rmsnorm");
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
