/* rope.cu — latent norm + RoPE + cache write, q's RoPE, and for decode-sized
 * steps the W_UK absorption, all in one launch (see rope.h). Blocks take
 * one of three roles by index: a token's latent (norm, k's RoPE, cache
 * write), a token's 8 heads of q (RoPE, bf16 copy), or 128 absorbed columns
 * of one head for every token of the step (its 32 KB of W_UK read once). */
#include <cuda_runtime.h>

#include "kernels/launch.cuh"
#include "kernels/rope.h"

#define QH 8      /* heads per q block */
#define AC 128    /* absorbed columns per block */
#define NT 256

typedef struct {
	dsk_kv_geom g;
	int layer;
	const float *kv, *nw;
	float eps;
	float *q;
	dsk_bf16 *qb;
	int nh, nope, rope, kvl, vd, T;
	const float *inv_freq;
	float af;
	const int32_t *seq, *pos;
	const dsk_bf16 *kvb; /* kv_b_proj [nh * (nope + vd)][kvl], NULL: no absorption */
	float *qabs;
	int nqb; /* q blocks per token */
} prep_args;

static __device__ void rope_cs(const prep_args &a, int p, float *cs)
{
	for (int i = threadIdx.x; i < a.rope / 2; i += blockDim.x) {
		const float ang = (float)p * a.inv_freq[i];
		cs[2 * i] = cosf(ang) * a.af;
		cs[2 * i + 1] = sinf(ang) * a.af;
	}
}

static __device__ void latent(const prep_args &a, int t, float *cs, float *red)
{
	const int p = a.pos[t], kvd = a.kvl + a.rope, kvl = a.kvl;
	rope_cs(a, p, cs);
	const float *kr = a.kv + (size_t)t * kvd;
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
	const float inv = (float)(1.0 / sqrt((double)red[0] / kvl + a.eps));
	const int32_t blk = a.g.tables[(size_t)a.seq[t] * a.g.max_blocks + p / a.g.block_tokens];
	dsk_bf16 *slot = a.g.pool + (size_t)blk * a.g.block_stride + (size_t)a.layer * a.g.layer_stride +
			 (size_t)(p % a.g.block_tokens) * kvd;
	for (int i = threadIdx.x; i < kvl; i += blockDim.x)
		slot[i] = __float2bfloat16(a.nw[i] * (kr[i] * inv));
	for (int i = threadIdx.x; i < a.rope / 2; i += blockDim.x) {
		float x = kr[kvl + 2 * i], y = kr[kvl + 2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
		slot[kvl + 2 * i] = __float2bfloat16(x * c - y * s);
		slot[kvl + 2 * i + 1] = __float2bfloat16(y * c + x * s);
	}
}

/* Heads h0.. h0+QH-1 of token t: q_pe rotated in place, q copied to bf16. */
static __device__ void q_heads(const prep_args &a, int t, int h0, float *cs)
{
	const int qk = a.nope + a.rope, hn = min(QH, a.nh - h0), half = a.rope / 2;
	rope_cs(a, a.pos[t], cs);
	__syncthreads();
	float *qr = a.q + ((size_t)t * a.nh + h0) * qk;
	dsk_bf16 *qbr = a.qb + ((size_t)t * a.nh + h0) * qk;
	for (int i = threadIdx.x; i < hn * a.nope; i += blockDim.x) {
		const int h = i / a.nope, d = i % a.nope;
		qbr[h * qk + d] = __float2bfloat16(qr[h * qk + d]);
	}
	for (int i = threadIdx.x; i < hn * half; i += blockDim.x) {
		const int h = i / half, k = i % half, d = h * qk + a.nope + 2 * k;
		const float x = qr[d], y = qr[d + 1], c = cs[2 * k], s = cs[2 * k + 1];
		const float x0 = x * c - y * s, x1 = y * c + x * s;
		qr[d] = x0;
		qr[d + 1] = x1;
		qbr[d] = __float2bfloat16(x0);
		qbr[d + 1] = __float2bfloat16(x1);
	}
}

/* qabs[t][h][c0 + j] = sum_d W_UK[h][d][c0 + j] q_nope[t][h][d] for every
 * token: a thread takes a column pair and a quarter of d. */
static __device__ void absorb(const prep_args &a, int h, int c0, float *sm)
{
	const int qk = a.nope + a.rope, tid = threadIdx.x, cp = tid % (AC / 2), dg = tid / (AC / 2);
	float *qn = sm;                          /* [DSK_ABSORB_MAX_T][nope] */
	float *red = sm + DSK_ABSORB_MAX_T * a.nope; /* [4][DSK_ABSORB_MAX_T][AC] */
	const dsk_bf16 *W = a.kvb + (size_t)h * (a.nope + a.vd) * a.kvl;
	for (int i = tid; i < a.T * a.nope; i += blockDim.x) {
		const int t = i / a.nope, d = i % a.nope;
		qn[i] = a.q[((size_t)t * a.nh + h) * qk + d];
	}
	__syncthreads();
	const int col = c0 + 2 * cp;
	float acc[DSK_ABSORB_MAX_T][2];
#pragma unroll
	for (int t = 0; t < DSK_ABSORB_MAX_T; t++)
		acc[t][0] = acc[t][1] = 0;
	if (col < a.kvl) {
#pragma unroll 4
		for (int d = dg; d < a.nope; d += 4) {
			const float2 w = __bfloat1622float2(*(const __nv_bfloat162 *)(W + (size_t)d * a.kvl + col));
#pragma unroll
			for (int t = 0; t < DSK_ABSORB_MAX_T; t++)
				if (t < a.T) {
					const float v = qn[t * a.nope + d];
					acc[t][0] += w.x * v;
					acc[t][1] += w.y * v;
				}
		}
	}
#pragma unroll
	for (int t = 0; t < DSK_ABSORB_MAX_T; t++)
		if (t < a.T) {
			red[(dg * DSK_ABSORB_MAX_T + t) * AC + 2 * cp] = acc[t][0];
			red[(dg * DSK_ABSORB_MAX_T + t) * AC + 2 * cp + 1] = acc[t][1];
		}
	__syncthreads();
	for (int i = tid; i < a.T * AC; i += blockDim.x) {
		const int t = i / AC, j = i % AC;
		if (c0 + j < a.kvl) {
			float v = 0;
			for (int k = 0; k < 4; k++)
				v += red[(k * DSK_ABSORB_MAX_T + t) * AC + j];
			a.qabs[((size_t)t * a.nh + h) * a.kvl + c0 + j] = v;
		}
	}
}

static __global__ void __launch_bounds__(NT) mla_prep_k(prep_args a)
{
	extern __shared__ float sm[];
	__shared__ float cs[512], red[32];
	int b = blockIdx.x;
	const int nq = a.T * a.nqb;
	dsk_pdl_enter();
	if (b < a.T) {
		latent(a, b, cs, red);
		return;
	}
	b -= a.T;
	if (b < nq) {
		q_heads(a, b / a.nqb, b % a.nqb * QH, cs);
		return;
	}
	b -= nq;
	const int nch = (a.kvl + AC - 1) / AC;
	absorb(a, b / nch, b % nch * AC, sm);
}

extern "C" int dsk_mla_prep(const dsk_kv_geom *g, int layer, const float *kv, const float *norm_w, float eps, float *q,
			    dsk_bf16 *qb, int nh, int nope, int rope, int kvl, const float *inv_freq, float attn_factor,
			    const int32_t *seq, const int32_t *pos, int T, const dsk_bf16 *kvb, int vd, float *qabs,
			    dsk_stream s, ds_err *e)
{
	if (rope > 512 || (rope & 1))
		return ds_errf(e, -EINVAL, "mla_prep: rope dim %d unsupported", rope);
	if (kvb && (T > DSK_ABSORB_MAX_T || !dsk_mla_absorb_ok(nope, kvl)))
		return ds_errf(e, -EINVAL, "mla_prep: absorption for %d tokens, nope %d, kv_lora_rank %d unsupported", T,
			       nope, kvl);
	if (T <= 0)
		return 0;
	prep_args a = { *g, layer, kv, norm_w, eps, q, qb, nh, nope, rope, kvl, vd, T, inv_freq, attn_factor, seq, pos,
			kvb, qabs, (nh + QH - 1) / QH };
	int blocks = T + T * a.nqb;
	size_t smem = 0;
	if (kvb) {
		blocks += nh * ((kvl + AC - 1) / AC);
		smem = sizeof(float) * DSK_ABSORB_MAX_T * ((size_t)nope + 4 * AC);
	}
	dsk_launch(mla_prep_k, blocks, NT, smem, s, a);
	return dsk_check(e, "mla_prep");
}
