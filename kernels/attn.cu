/* attn.cu — split-KV absorbed MLA attention (see attn.h).
 * A block of 8 warps serves one token, 8 heads and one KV range: warp w owns
 * head h0+w's scores and online-softmax state, and every thread owns up to
 * two latent columns of all 8 heads' accumulators. The cache is read in
 * tiles of 16 positions through the block table, once per 8 heads. */
#include <cuda_runtime.h>
#include <math.h>

#include "kernels/attn.h"

#define HB 8
#define TILE 16
#define NT 256
#define MAXC 2 /* columns per thread: kvl <= 512 */

static __global__ void __launch_bounds__(NT) attn_k(dsk_attn_args a, int nsplit, int chunk)
{
	extern __shared__ float sm[];
	const int kvl = a.kvl, kvd = a.kvl + a.rope, qk = a.nope + a.rope;
	float *qs = sm;                                    /* [HB][kvd] */
	float *p = qs + HB * kvd;                          /* [HB][TILE] */
	float *alpha = p + HB * TILE;                      /* [HB] */
	dsk_bf16 *kt = (dsk_bf16 *)(alpha + HB + 8);       /* [TILE][kvd], 16-byte aligned */
	const int t = a.list ? a.list[blockIdx.x] : blockIdx.x, h0 = blockIdx.y * HB, split = blockIdx.z;
	const int tid = threadIdx.x, w = tid / 32, lane = tid & 31;
	const int n = a.pos[t] + 1;
	const int j0 = split * chunk, j1 = min(n, j0 + chunk);
	const int32_t *table = a.g.tables + (size_t)a.seq[t] * a.g.max_blocks;

	for (int i = tid; i < HB * kvd; i += NT) {
		const int h = i / kvd, d = i % kvd, hh = h0 + h;
		float v = 0;
		if (hh < a.nh)
			v = d < kvl ? a.qabs[((size_t)t * a.nh + hh) * kvl + d]
				    : a.q[((size_t)t * a.nh + hh) * qk + a.nope + (d - kvl)];
		qs[i] = v;
	}
	float acc[HB][MAXC];
#pragma unroll
	for (int h = 0; h < HB; h++)
#pragma unroll
		for (int c = 0; c < MAXC; c++)
			acc[h][c] = 0;
	float m = -INFINITY, l = 0;
	const bool head_ok = h0 + w < a.nh;
	const int vec = kvd / 8; /* uint4 per row */

	for (int jt = j0; jt < j1; jt += TILE) {
		__syncthreads();
		for (int i = tid; i < TILE * vec; i += NT) {
			const int r = i / vec, v = i % vec, j = jt + r;
			uint4 val = make_uint4(0, 0, 0, 0);
			if (j < j1) {
				const int32_t blk = table[j / a.g.block_tokens];
				const dsk_bf16 *src = a.g.pool + (size_t)blk * a.g.block_stride +
						      (size_t)a.layer * a.g.layer_stride + (size_t)(j % a.g.block_tokens) * kvd;
				val = ((const uint4 *)src)[v];
			}
			((uint4 *)(kt + (size_t)r * kvd))[v] = val;
		}
		__syncthreads();
		float my = -INFINITY;
		if (head_ok) {
			const float *qh = qs + w * kvd;
			for (int r = 0; r < TILE; r++) {
				const dsk_bf16 *kr = kt + (size_t)r * kvd;
				float d = 0;
				for (int i = lane; i < kvd; i += 32)
					d += qh[i] * __bfloat162float(kr[i]);
				for (int o = 16; o; o >>= 1)
					d += __shfl_xor_sync(0xffffffffu, d, o);
				if (lane == r)
					my = jt + r < j1 ? d * a.scale : -INFINITY;
			}
		}
		float mt = my;
		for (int o = 16; o; o >>= 1)
			mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
		const float mn = fmaxf(m, mt);
		const float al = mn == -INFINITY ? 1.0f : expf(m - mn);
		const float pr = my == -INFINITY ? 0.0f : expf(my - mn);
		float ps = pr;
		for (int o = 16; o; o >>= 1)
			ps += __shfl_xor_sync(0xffffffffu, ps, o);
		l = l * al + ps;
		m = mn;
		if (lane < TILE)
			p[w * TILE + lane] = pr;
		if (lane == 0)
			alpha[w] = al;
		__syncthreads();
#pragma unroll
		for (int c = 0; c < MAXC; c++) {
			const int col = tid + c * NT;
			if (col < kvl) {
				float kv[TILE];
#pragma unroll
				for (int r = 0; r < TILE; r++)
					kv[r] = __bfloat162float(kt[(size_t)r * kvd + col]);
#pragma unroll
				for (int h = 0; h < HB; h++) {
					float s = acc[h][c] * alpha[h];
#pragma unroll
					for (int r = 0; r < TILE; r++)
						s += p[h * TILE + r] * kv[r];
					acc[h][c] = s;
				}
			}
		}
	}
	float *part = a.ws;
	float *ml = a.ws + (size_t)a.T * a.nh * nsplit * kvl;
#pragma unroll
	for (int h = 0; h < HB; h++) {
		if (h0 + h >= a.nh)
			break;
		const size_t base = (((size_t)t * a.nh + h0 + h) * nsplit + split);
#pragma unroll
		for (int c = 0; c < MAXC; c++) {
			const int col = tid + c * NT;
			if (col < kvl)
				part[base * kvl + col] = acc[h][c];
		}
	}
	if (head_ok && lane == 0) {
		const size_t base = (((size_t)t * a.nh + h0 + w) * nsplit + split);
		ml[2 * base] = m;
		ml[2 * base + 1] = l;
	}
}

static __global__ void merge_k(dsk_attn_args a, int nsplit)
{
	const int t = a.list ? a.list[blockIdx.x] : blockIdx.x, h = blockIdx.y, kvl = a.kvl;
	const size_t base = ((size_t)t * a.nh + h) * nsplit;
	const float *part = a.ws + base * kvl;
	const float *ml = a.ws + (size_t)a.T * a.nh * nsplit * kvl + 2 * base;
	float M = -INFINITY;
	for (int s = 0; s < nsplit; s++)
		M = fmaxf(M, ml[2 * s]);
	float L = 0;
	for (int s = 0; s < nsplit; s++)
		if (ml[2 * s] != -INFINITY)
			L += ml[2 * s + 1] * expf(ml[2 * s] - M);
	const float inv = 1.0f / L;
	for (int c = threadIdx.x; c < kvl; c += blockDim.x) {
		float v = 0;
		for (int s = 0; s < nsplit; s++)
			if (ml[2 * s] != -INFINITY)
				v += part[(size_t)s * kvl + c] * expf(ml[2 * s] - M);
		a.lat[((size_t)t * a.nh + h) * kvl + c] = __float2bfloat16(v * inv);
	}
}

extern "C" int dsk_attn_splits(int T, int nh, int max_len, int sms)
{
	const int blocks = T * ((nh + HB - 1) / HB);
	int s = (2 * sms + blocks - 1) / blocks;
	const int most = (max_len + 63) / 64; /* at least 64 positions a split */
	if (s > most)
		s = most;
	if (s > 64)
		s = 64;
	return s < 1 ? 1 : s;
}

extern "C" size_t dsk_attn_ws_floats(int T, int nh, int kvl, int nsplit)
{
	return (size_t)T * nh * nsplit * (kvl + 2);
}

extern "C" int dsk_mla_attention(const dsk_attn_args *a, int nsplit, dsk_stream s, ds_err *e)
{
	const int kvd = a->kvl + a->rope;
	if (a->kvl > MAXC * NT || kvd % 8)
		return ds_errf(e, -EINVAL, "mla_attention: kv_lora_rank %d + rope %d unsupported", a->kvl, a->rope);
	const int rows = a->list ? a->n_list : a->T;
	if (a->T <= 0 || rows <= 0)
		return 0;
	int chunk = (a->max_len + nsplit - 1) / nsplit;
	chunk = (chunk + TILE - 1) / TILE * TILE;
	const size_t smem = sizeof(float) * (HB * kvd + HB * TILE + HB + 8) + sizeof(dsk_bf16) * TILE * kvd;
	static int raised;
	if (!raised) {
		cudaFuncSetAttribute(attn_k, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024);
		raised = 1;
	}
	dim3 grid(rows, (a->nh + HB - 1) / HB, nsplit);
	attn_k<<<grid, NT, smem, s>>>(*a, nsplit, chunk);
	int rc = dsk_check(e, "mla_attention");
	if (rc)
		return rc;
	merge_k<<<dim3(rows, a->nh), 128, 0, s>>>(*a, nsplit);
	return dsk_check(e, "mla_attention_merge");
}

/* ---- prefill through GEMMs (see attn.h) ---- */

static __global__ void kv_gather_k(dsk_kv_geom g, int layer, const int32_t *table, int kvd, dsk_bf16 *kc)
{
	const int j = blockIdx.x;
	const int32_t blk = table[j / g.block_tokens];
	const uint4 *src = (const uint4 *)(g.pool + (size_t)blk * g.block_stride + (size_t)layer * g.layer_stride +
					   (size_t)(j % g.block_tokens) * kvd);
	uint4 *dst = (uint4 *)(kc + (size_t)j * kvd);
	for (int v = threadIdx.x; v < kvd / 8; v += blockDim.x)
		dst[v] = src[v];
}

extern "C" int dsk_kv_gather(const dsk_kv_geom *g, int layer, const int32_t *table, int len, int kvd, dsk_bf16 *kc,
			     dsk_stream s, ds_err *e)
{
	if (len <= 0)
		return 0;
	kv_gather_k<<<len, 128, 0, s>>>(*g, layer, table, kvd, kc);
	return dsk_check(e, "kv_gather");
}

static __global__ void qcat_k(dsk_bf16 *qc, const float *qabs, const float *q, int nh, int h0, int hc, int nope,
			      int rope, int kvl)
{
	const int i = blockIdx.x, kvd = kvl + rope, qk = nope + rope;
	for (int x = threadIdx.x; x < hc * kvd; x += blockDim.x) {
		const int hh = x / kvd, d = x % kvd, h = h0 + hh;
		float v = d < kvl ? qabs[((size_t)i * nh + h) * kvl + d] : q[((size_t)i * nh + h) * qk + nope + d - kvl];
		qc[(size_t)i * hc * kvd + x] = __float2bfloat16(v);
	}
}

extern "C" int dsk_qcat(dsk_bf16 *qc, const float *qabs, const float *q, int n, int nh, int h0, int hc, int nope,
			int rope, int kvl, dsk_stream s, ds_err *e)
{
	if (n <= 0)
		return 0;
	qcat_k<<<n, 256, 0, s>>>(qc, qabs, q, nh, h0, hc, nope, rope, kvl);
	return dsk_check(e, "qcat");
}

#define SM_MAXE 32
/* Row (h, i) of S [rows][len] float: softmax of scale*S over j <= p0+i,
 * written back as bf16 over the first half of the same row. */
static __global__ void causal_softmax_k(float *S, int len, int n, int p0, float scale)
{
	__shared__ float red[32];
	const size_t row = blockIdx.x;
	const int i = (int)(row % n), last = p0 + i;
	float *r = S + row * len;
	float v[SM_MAXE];
	float mx = -INFINITY;
#pragma unroll
	for (int k = 0; k < SM_MAXE; k++) {
		const int j = threadIdx.x + k * blockDim.x;
		v[k] = j < len && j <= last ? r[j] * scale : -INFINITY;
		mx = fmaxf(mx, v[k]);
	}
	for (int o = 16; o; o >>= 1)
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x / 32] = mx;
	__syncthreads();
	mx = -INFINITY;
	for (int w = 0; w < (int)blockDim.x / 32; w++)
		mx = fmaxf(mx, red[w]);
	__syncthreads();
	float sum = 0;
#pragma unroll
	for (int k = 0; k < SM_MAXE; k++) {
		v[k] = v[k] == -INFINITY ? 0.0f : expf(v[k] - mx);
		sum += v[k];
	}
	for (int o = 16; o; o >>= 1)
		sum += __shfl_xor_sync(0xffffffffu, sum, o);
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x / 32] = sum;
	__syncthreads();
	sum = 0;
	for (int w = 0; w < (int)blockDim.x / 32; w++)
		sum += red[w];
	const float inv = 1.0f / sum;
	dsk_bf16 *p = (dsk_bf16 *)r;
#pragma unroll
	for (int k = 0; k < SM_MAXE; k++) {
		const int j = threadIdx.x + k * blockDim.x;
		if (j < len)
			p[j] = __float2bfloat16(v[k] * inv);
	}
}

extern "C" int dsk_causal_softmax(float *S, int rows, int len, int n, int p0, float scale, dsk_stream s, ds_err *e)
{
	if (len > SM_MAXE * 256)
		return ds_errf(e, -EINVAL, "causal_softmax: %d positions (at most %d)", len, SM_MAXE * 256);
	if (rows <= 0)
		return 0;
	causal_softmax_k<<<rows, 256, 0, s>>>(S, len, n, p0, scale);
	return dsk_check(e, "causal_softmax");
}
