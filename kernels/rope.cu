/* rope.cu — latent norm + RoPE + cache write, and q's RoPE (see rope.h). */
#include <cuda_runtime.h>

#include "kernels/rope.h"

static __global__ void mla_prep_k(dsk_kv_geom g, int layer, const float *kv, const float *nw, float eps, float *q,
				  dsk_bf16 *qb, int nh, int nope, int rope, int kvl, const float *inv_freq, float af,
				  const int32_t *seq, const int32_t *pos)
{
	__shared__ float red[32];
	__shared__ float cs[2 * 256];
	const int t = blockIdx.x, p = pos[t], kvd = kvl + rope, qk = nope + rope;
	for (int i = threadIdx.x; i < rope / 2; i += blockDim.x) {
		float ang = (float)p * inv_freq[i];
		cs[2 * i] = cosf(ang) * af;
		cs[2 * i + 1] = sinf(ang) * af;
	}
	const float *kr = kv + (size_t)t * kvd;
	float ss = 0;
	for (int i = threadIdx.x; i < kvl; i += blockDim.x)
		ss += kr[i] * kr[i];
	for (int o = 16; o; o >>= 1)
		ss += __shfl_xor_sync(0xffffffffu, ss, o);
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x / 32] = ss;
	__syncthreads();
	if (threadIdx.x < 32) {
		float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0f;
		for (int o = 16; o; o >>= 1)
			v += __shfl_xor_sync(0xffffffffu, v, o);
		if (threadIdx.x == 0)
			red[0] = v;
	}
	__syncthreads();
	const float inv = (float)(1.0 / sqrt((double)red[0] / kvl + eps));
	const int32_t blk = g.tables[(size_t)seq[t] * g.max_blocks + p / g.block_tokens];
	dsk_bf16 *slot = g.pool + (size_t)blk * g.block_stride + (size_t)layer * g.layer_stride +
			 (size_t)(p % g.block_tokens) * kvd;
	for (int i = threadIdx.x; i < kvl; i += blockDim.x)
		slot[i] = __float2bfloat16(nw[i] * (kr[i] * inv));
	for (int i = threadIdx.x; i < rope / 2; i += blockDim.x) {
		float a = kr[kvl + 2 * i], b = kr[kvl + 2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
		slot[kvl + 2 * i] = __float2bfloat16(a * c - b * s);
		slot[kvl + 2 * i + 1] = __float2bfloat16(b * c + a * s);
	}
	float *qr = q + (size_t)t * nh * qk;
	dsk_bf16 *qbr = qb + (size_t)t * nh * qk;
	for (int i = threadIdx.x; i < nh * qk; i += blockDim.x) {
		const int d = i % qk;
		if (d < nope) {
			qbr[i] = __float2bfloat16(qr[i]);
		} else if (((d - nope) & 1) == 0) {
			const int k = (d - nope) / 2;
			float a = qr[i], b = qr[i + 1], c = cs[2 * k], s = cs[2 * k + 1];
			float x0 = a * c - b * s, x1 = b * c + a * s;
			qr[i] = x0;
			qr[i + 1] = x1;
			qbr[i] = __float2bfloat16(x0);
			qbr[i + 1] = __float2bfloat16(x1);
		}
	}
}

extern "C" int dsk_mla_prep(const dsk_kv_geom *g, int layer, const float *kv, const float *norm_w, float eps, float *q,
			    dsk_bf16 *qb, int nh, int nope, int rope, int kvl, const float *inv_freq, float attn_factor,
			    const int32_t *seq, const int32_t *pos, int T, dsk_stream s, ds_err *e)
{
	if (rope > 512 || (rope & 1))
		return ds_errf(e, -EINVAL, "mla_prep: rope dim %d unsupported", rope);
	if (T <= 0)
		return 0;
	mla_prep_k<<<T, 256, 0, s>>>(*g, layer, kv, norm_w, eps, q, qb, nh, nope, rope, kvl, inv_freq, attn_factor, seq,
				     pos);
	return dsk_check(e, "mla_prep");
}
