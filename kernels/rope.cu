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

/* Token t's cache slot: positions, sequences and block tables are step
 * inputs, read before the wait (kernels/launch.cuh). */
static __device__ dsk_bf16 *latent_slot(const prep_args &a, int t)
{
	const int p = a.pos[t];
	const int32_t blk = a.g.tables[(size_t)a.seq[t] * a.g.max_blocks + p / a.g.block_tokens];
	return a.g.pool + (size_t)blk * a.g.block_stride + (size_t)a.layer * a.g.layer_stride +
	       (size_t)(p % a.g.block_tokens) * (a.kvl + a.rope);
}

static __device__ void latent(const prep_args &a, int t, float *cs, float *red, dsk_bf16 *slot)
{
	const int kvd = a.kvl + a.rope, kvl = a.kvl;
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
	__syncthreads(); /* cs, filled before the wait */
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

/* qabs[t][h][c0 + j] = sum_d W_UK[h][d][c0 + j] q_nope[t][h][d] for the T
 * tokens: lane l of warp w takes columns c0 + 8 (l % 16) .. + 7 (16 bytes
 * of each W_UK row) and the rows d = 16 i + 2 w + l / 16, i < nope / 16;
 * the first AB of those rows load before the wait for the previous kernel
 * (weights are never written), so only q's round trip is left after it
 * (4-byte loads, four in flight, took 8 us a layer at V2-Lite's batch 1,
 * ncu). Partial sums: the lane pair by shuffle, then the 8 warps in order
 * through shared memory. */
#define AB 8
static __device__ void absorb_pre(const prep_args &a, int h, int c0, uint4 *wv)
{
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, col = c0 + 8 * (lane & 15);
	const dsk_bf16 *W = a.kvb + (size_t)h * (a.nope + a.vd) * a.kvl;
#pragma unroll
	for (int i = 0; i < AB; i++) {
		const int d = 16 * i + 2 * w + (lane >> 4);
		wv[i] = d < a.nope && col < a.kvl ? *(const uint4 *)(W + (size_t)d * a.kvl + col) : make_uint4(0, 0, 0, 0);
	}
}

template <int TT>
static __device__ void absorb(const prep_args &a, int h, int c0, float *sm, const uint4 *wv)
{
	const int qk = a.nope + a.rope, tid = threadIdx.x, lane = tid & 31, w = tid >> 5, T = a.T;
	const int col = c0 + 8 * (lane & 15);
	float *qn = sm;                 /* [T][nope] */
	float *red = sm + T * a.nope;   /* [NT / 32][T][AC] */
	const dsk_bf16 *W = a.kvb + (size_t)h * (a.nope + a.vd) * a.kvl;
	for (int i = tid; i < T * a.nope; i += blockDim.x) {
		const int t = i / a.nope, d = i % a.nope;
		qn[i] = a.q[((size_t)t * a.nh + h) * qk + d];
	}
	__syncthreads();
	float acc[TT][8];
#pragma unroll
	for (int t = 0; t < TT; t++)
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[t][j] = 0;
	for (int i0 = 0; 16 * i0 < a.nope; i0 += AB) {
		uint4 wl[AB];
#pragma unroll
		for (int i = 0; i < AB; i++) {
			const int d = 16 * (i0 + i) + 2 * w + (lane >> 4);
			wl[i] = i0 == 0 ? wv[i]
			      : d < a.nope && col < a.kvl ? *(const uint4 *)(W + (size_t)d * a.kvl + col) : make_uint4(0, 0, 0, 0);
		}
#pragma unroll
		for (int i = 0; i < AB; i++) {
			const int d = 16 * (i0 + i) + 2 * w + (lane >> 4);
			if (d >= a.nope)
				break;
			float wf[8];
#pragma unroll
			for (int j = 0; j < 4; j++) {
				const float2 f = __bfloat1622float2(((const __nv_bfloat162 *)&wl[i])[j]);
				wf[2 * j] = f.x;
				wf[2 * j + 1] = f.y;
			}
#pragma unroll
			for (int t = 0; t < TT; t++)
				if (t < T) {
					const float v = qn[t * a.nope + d];
#pragma unroll
					for (int j = 0; j < 8; j++)
						acc[t][j] += wf[j] * v;
				}
		}
	}
#pragma unroll
	for (int t = 0; t < TT; t++)
		if (t < T)
#pragma unroll
			for (int j = 0; j < 8; j++) {
				acc[t][j] += __shfl_xor_sync(0xffffffffu, acc[t][j], 16);
				if (lane < 16)
					red[((size_t)w * T + t) * AC + 8 * lane + j] = acc[t][j];
			}
	__syncthreads();
	for (int i = tid; i < T * AC; i += blockDim.x) {
		const int t = i / AC, j = i % AC;
		if (c0 + j < a.kvl) {
			float v = 0;
			for (int k = 0; k < NT / 32; k++)
				v += red[((size_t)k * T + t) * AC + j];
			a.qabs[((size_t)t * a.nh + h) * a.kvl + c0 + j] = v;
		}
	}
}

/* TT: the most tokens (1, 2 or DSK_ABSORB_MAX_T), which sizes the
 * absorption's accumulators; 0: no absorption (prefill chunks), without
 * its registers (158 at TT = 8 against 48: a 4096-token chunk's 12,288
 * blocks took 270 us a layer on an H100). */
template <int TT>
static __global__ void __launch_bounds__(NT) mla_prep_k(prep_args a)
{
	extern __shared__ float sm[];
	__shared__ float cs[512], red[32];
	int b = blockIdx.x;
	const int nq = a.T * a.nqb, nch = (a.kvl + AC - 1) / AC, ab = b - a.T - nq;
	uint4 wv[AB];
	dsk_bf16 *slot = NULL;
	if (TT > 0 && ab >= 0)
		absorb_pre(a, ab / nch, ab % nch * AC, wv);
	else if (b < a.T) {
		slot = latent_slot(a, b);
		rope_cs(a, a.pos[b], cs);
	} else {
		rope_cs(a, a.pos[(b - a.T) / a.nqb], cs);
	}
	dsk_pdl_enter();
	if (b < a.T) {
		latent(a, b, cs, red, slot);
		return;
	}
	b -= a.T;
	if (b < nq) {
		q_heads(a, b / a.nqb, b % a.nqb * QH, cs);
		return;
	}
	if constexpr (TT > 0)
		absorb<TT>(a, ab / nch, ab % nch * AC, sm, wv);
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
		smem = sizeof(float) * T * ((size_t)nope + NT / 32 * AC);
	}
	if (!kvb)
		dsk_launch(mla_prep_k<0>, blocks, NT, smem, s, a);
	else if (T == 1)
		dsk_launch(mla_prep_k<1>, blocks, NT, smem, s, a);
	else if (T == 2)
		dsk_launch(mla_prep_k<2>, blocks, NT, smem, s, a);
	else
		dsk_launch(mla_prep_k<DSK_ABSORB_MAX_T>, blocks, NT, smem, s, a);
	return dsk_check(e, "mla_prep");
}
