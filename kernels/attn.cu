/* attn.cu — split-KV absorbed MLA attention (see attn.h).
 * A block of 4 warps serves one token, 16 heads and one KV range, on the
 * tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulators): the 16
 * heads' absorbed queries are the A operand of both products, so the cache
 * is read once per 16 heads. Per tile of 32 positions: warp w scores
 * positions 8w..8w+7 for all heads (S = Q K^T over kv_lora_rank + rope),
 * the online softmax runs a head per lane group, and warp w accumulates
 * latent columns kvl/4 * w .. for all heads (lat += P C). Queries and
 * probabilities enter as a bf16 pair (hi + lo, two products each), which
 * keeps them to ~16 mantissa bits: single bf16 rounding doubled the
 * decode-vs-prefill difference on the random test models. Cache tiles
 * arrive by cp.async, all of a thread's rows in flight at once. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/attn.h"
#include "kernels/launch.cuh"

#define HB 16    /* heads per block: the mma's M */
#define TILE 32  /* positions per iteration */
#define NW 4     /* warps */
#define MAXNT 16 /* latent n-tiles of 8 per warp: kvl <= 512 */
#define QLD 18   /* query float4 loads in flight a thread: 16 heads x 576 / 128 threads / 4 */

static __device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
						 uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
		     "{%0,%1,%2,%3};\n"
		     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
		     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t ld32(const dsk_bf16 *p) { return *(const uint32_t *)p; }

/* 16 bytes global -> shared, zero-filled when !valid. */
static __device__ __forceinline__ void cp16(void *dst, const void *src, bool valid)
{
	const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}

static __device__ __forceinline__ void cp_wait_all(void)
{
	asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
}

/* x = hi + lo, both bf16. */
static __device__ __forceinline__ void split_bf16(float x, dsk_bf16 *hi, dsk_bf16 *lo)
{
	*hi = __float2bfloat16(x);
	*lo = __float2bfloat16(x - __bfloat162float(*hi));
}

static __device__ __forceinline__ uint32_t pack2(const dsk_bf16 *lo, const dsk_bf16 *hi)
{
	return (uint32_t)(*(const uint16_t *)lo) | ((uint32_t)(*(const uint16_t *)hi) << 16);
}

static __global__ void __launch_bounds__(NW * 32) attn_k(dsk_attn_args a, int nsplit, int chunk)
{
	extern __shared__ __align__(16) unsigned char smem_raw[];
	const int kvl = a.kvl, kvd = a.kvl + a.rope, qk = a.nope + a.rope, ld = kvd + 8; /* +8: no bank conflicts */
	dsk_bf16 *qs = (dsk_bf16 *)smem_raw;                 /* [HB][ld] queries, hi */
	dsk_bf16 *ql = qs + HB * ld;                         /* [HB][ld] lo */
	dsk_bf16 *ks = ql + HB * ld;                         /* [TILE][ld] cache rows */
	float *sf = (float *)(ks + TILE * ld);               /* [HB][TILE] scores */
	dsk_bf16 *ps = (dsk_bf16 *)(sf + HB * TILE);         /* [HB][TILE + 8] probabilities, hi */
	dsk_bf16 *pl = ps + HB * (TILE + 8);                 /* lo */
	float *mrow = (float *)(pl + HB * (TILE + 8));       /* [HB] running max, sum, rescale */
	float *lrow = mrow + HB, *alpha = lrow + HB;
	const dsk_bf16 **rowp = (const dsk_bf16 **)(alpha + HB + 2); /* [TILE] (8-byte aligned) */
	const int t = a.list ? a.list[blockIdx.x] : blockIdx.x, h0 = blockIdx.y * HB, split = blockIdx.z;
	const int tid = threadIdx.x, w = tid / 32, lane = tid & 31, g = lane >> 2, q = lane & 3;
	const int n = a.pos[t] + 1;
	const int j0 = split * chunk, j1 = min(n, j0 + chunk);
	const int32_t *table = a.g.tables + (size_t)a.seq[t] * a.g.max_blocks;
	const int ntw = kvl / 8 / NW; /* n-tiles per warp */

	dsk_pdl_enter();
	const int vec = kvd / 8; /* uint4 per row */
	/* The first tile's cache rows start arriving (cp.async) before the
	 * queries load: at batch 1 a split is one tile, and the two round trips
	 * overlap instead of following each other. */
	if (tid < TILE) {
		const int j = j0 + tid;
		rowp[tid] = j < j1 ? a.g.pool + (size_t)table[j / a.g.block_tokens] * a.g.block_stride +
					     (size_t)a.layer * a.g.layer_stride + (size_t)(j % a.g.block_tokens) * kvd
				   : a.g.pool;
	}
	__syncthreads();
	if (j0 < j1)
		for (int i = tid; i < TILE * vec; i += NW * 32) {
			const int r = i / vec, v = i % vec;
			cp16(ks + (size_t)r * ld + v * 8, rowp[r] + v * 8, j0 + r < j1);
		}
	asm volatile("cp.async.commit_group;\n" ::);
	/* The 16 heads' queries as float4s, QLD loads in flight a thread: one
	 * round trip for the 576-wide MLA latent + rope. */
	{
		const int v4 = kvd / 4, total = HB * v4;
		for (int i0 = tid; i0 < total; i0 += NW * 32 * QLD) {
			float4 v[QLD];
#pragma unroll
			for (int u = 0; u < QLD; u++) {
				const int i = i0 + u * NW * 32, h = i / v4, d = i % v4 * 4, hh = h0 + h;
				v[u] = make_float4(0, 0, 0, 0);
				if (i < total && hh < a.nh)
					v[u] = d < kvl ? *(const float4 *)(a.qabs + ((size_t)t * a.nh + hh) * kvl + d)
						       : *(const float4 *)(a.q + ((size_t)t * a.nh + hh) * qk + a.nope + (d - kvl));
			}
#pragma unroll
			for (int u = 0; u < QLD; u++) {
				const int i = i0 + u * NW * 32, h = i / v4, d = i % v4 * 4;
				if (i < total) {
					split_bf16(v[u].x, &qs[h * ld + d], &ql[h * ld + d]);
					split_bf16(v[u].y, &qs[h * ld + d + 1], &ql[h * ld + d + 1]);
					split_bf16(v[u].z, &qs[h * ld + d + 2], &ql[h * ld + d + 2]);
					split_bf16(v[u].w, &qs[h * ld + d + 3], &ql[h * ld + d + 3]);
				}
			}
		}
	}
	if (tid < HB) {
		mrow[tid] = -INFINITY;
		lrow[tid] = 0;
	}
	float acc[MAXNT][4];
#pragma unroll
	for (int j = 0; j < MAXNT; j++)
		acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;

	for (int jt = j0; jt < j1; jt += TILE) {
		if (jt > j0) { /* the first tile was issued above */
			__syncthreads(); /* the last tile's readers are done */
			if (tid < TILE) {
				const int j = jt + tid;
				rowp[tid] = j < j1 ? a.g.pool + (size_t)table[j / a.g.block_tokens] * a.g.block_stride +
							     (size_t)a.layer * a.g.layer_stride +
							     (size_t)(j % a.g.block_tokens) * kvd
						   : a.g.pool;
			}
			__syncthreads();
			for (int i = tid; i < TILE * vec; i += NW * 32) {
				const int r = i / vec, v = i % vec;
				cp16(ks + (size_t)r * ld + v * 8, rowp[r] + v * 8, jt + r < j1);
			}
		}
		cp_wait_all();
		__syncthreads();
		/* Scores of positions 8w..8w+7 for the 16 heads: four independent
		 * accumulators (hi/lo, even/odd k step), as one chain of 72
		 * dependent mmas was the tile's longest latency. */
		{
			float c[4][4] = {};
			const dsk_bf16 *qa = qs + g * ld + q * 2, *qb = qs + (g + 8) * ld + q * 2;
			const dsk_bf16 *la = ql + g * ld + q * 2, *lb = ql + (g + 8) * ld + q * 2;
			const dsk_bf16 *kb = ks + (w * 8 + g) * ld + q * 2;
#pragma unroll 4
			for (int k0 = 0; k0 < kvd; k0 += 16) {
				float *ch = c[(k0 >> 4) & 1], *cl = c[2 + ((k0 >> 4) & 1)];
				const uint32_t b0 = ld32(kb + k0), b1 = ld32(kb + k0 + 8);
				mma16816(ch, ld32(qa + k0), ld32(qb + k0), ld32(qa + k0 + 8), ld32(qb + k0 + 8), b0, b1);
				mma16816(cl, ld32(la + k0), ld32(lb + k0), ld32(la + k0 + 8), ld32(lb + k0 + 8), b0, b1);
			}
#pragma unroll
			for (int i = 0; i < 4; i++)
				c[0][i] = (c[0][i] + c[1][i]) + (c[2][i] + c[3][i]);
			const int p0 = w * 8 + q * 2;
			sf[g * TILE + p0] = jt + p0 < j1 ? c[0][0] * a.scale : -INFINITY;
			sf[g * TILE + p0 + 1] = jt + p0 + 1 < j1 ? c[0][1] * a.scale : -INFINITY;
			sf[(g + 8) * TILE + p0] = jt + p0 < j1 ? c[0][2] * a.scale : -INFINITY;
			sf[(g + 8) * TILE + p0 + 1] = jt + p0 + 1 < j1 ? c[0][3] * a.scale : -INFINITY;
		}
		__syncthreads();
		/* Online softmax: warp w takes heads 4w..4w+3 side by side (their
		 * shuffles interleave), a lane per position. */
		{
			enum { HW = HB / NW };
			float sv[HW], mt[HW], mn[HW], sum[HW];
#pragma unroll
			for (int hh = 0; hh < HW; hh++)
				mt[hh] = sv[hh] = sf[(w * HW + hh) * TILE + lane];
			for (int o = 16; o; o >>= 1)
#pragma unroll
				for (int hh = 0; hh < HW; hh++)
					mt[hh] = fmaxf(mt[hh], __shfl_xor_sync(0xffffffffu, mt[hh], o));
#pragma unroll
			for (int hh = 0; hh < HW; hh++) {
				const int h = w * HW + hh;
				mn[hh] = fmaxf(mrow[h], mt[hh]);
				const float pr = sv[hh] == -INFINITY ? 0.0f : expf(sv[hh] - mn[hh]);
				sum[hh] = pr;
				split_bf16(pr, &ps[h * (TILE + 8) + lane], &pl[h * (TILE + 8) + lane]);
			}
			for (int o = 16; o; o >>= 1)
#pragma unroll
				for (int hh = 0; hh < HW; hh++)
					sum[hh] += __shfl_xor_sync(0xffffffffu, sum[hh], o);
			if (lane == 0)
#pragma unroll
				for (int hh = 0; hh < HW; hh++) {
					const int h = w * HW + hh;
					const float mo = mrow[h];
					const float al = mn[hh] == -INFINITY ? 1.0f : expf(mo - mn[hh]);
					alpha[h] = al;
					lrow[h] = lrow[h] * al + sum[hh];
					mrow[h] = mn[hh];
				}
		}
		__syncthreads();
		/* lat[16 heads][cols of warp w] = alpha * lat + P C. */
		const float al0 = alpha[g], al1 = alpha[g + 8];
#pragma unroll
		for (int j = 0; j < MAXNT; j++) {
			acc[j][0] *= al0;
			acc[j][1] *= al0;
			acc[j][2] *= al1;
			acc[j][3] *= al1;
		}
#pragma unroll
		for (int kk = 0; kk < TILE; kk += 16) {
			const dsk_bf16 *pa = ps + g * (TILE + 8) + kk + q * 2, *pb = ps + (g + 8) * (TILE + 8) + kk + q * 2;
			const uint32_t a0 = ld32(pa), a1 = ld32(pb), a2 = ld32(pa + 8), a3 = ld32(pb + 8);
			const int lo = HB * (TILE + 8); /* pl - ps */
			const uint32_t l0 = ld32(pa + lo), l1 = ld32(pb + lo), l2 = ld32(pa + lo + 8), l3 = ld32(pb + lo + 8);
			const dsk_bf16 *kr = ks + (size_t)(kk + q * 2) * ld + g;
#pragma unroll
			for (int j = 0; j < MAXNT; j++) {
				if (j < ntw) {
					const int col = (w * ntw + j) * 8;
					const uint32_t b0 = pack2(kr + col, kr + ld + col);
					const uint32_t b1 = pack2(kr + 8 * ld + col, kr + 9 * ld + col);
					mma16816(acc[j], a0, a1, a2, a3, b0, b1);
					mma16816(acc[j], l0, l1, l2, l3, b0, b1);
				}
			}
		}
	}
	float *part = a.ws;
	float *ml = a.ws + (size_t)a.T * a.nh * nsplit * kvl;
#pragma unroll
	for (int j = 0; j < MAXNT; j++) {
		if (j >= ntw)
			break;
		const int col = (w * ntw + j) * 8 + q * 2;
		if (h0 + g < a.nh) {
			float *o = part + (((size_t)t * a.nh + h0 + g) * nsplit + split) * kvl + col;
			o[0] = acc[j][0];
			o[1] = acc[j][1];
		}
		if (h0 + g + 8 < a.nh) {
			float *o = part + (((size_t)t * a.nh + h0 + g + 8) * nsplit + split) * kvl + col;
			o[0] = acc[j][2];
			o[1] = acc[j][3];
		}
	}
	__syncthreads();
	if (tid < HB && h0 + tid < a.nh) {
		const size_t base = (((size_t)t * a.nh + h0 + tid) * nsplit + split);
		ml[2 * base] = mrow[tid];
		ml[2 * base + 1] = lrow[tid];
	}
}

/* Each split's weight exp(m_s - M) / L once, by one warp; then every column
 * is an independent weighted sum over the splits. */
#define MPRE 32
static __global__ void merge_k(dsk_attn_args a, int nsplit)
{
	__shared__ float wgt[64];
	dsk_pdl_enter();
	const int t = a.list ? a.list[blockIdx.x] : blockIdx.x, h = blockIdx.y, kvl = a.kvl;
	const size_t base = ((size_t)t * a.nh + h) * nsplit;
	const float *part = a.ws + base * kvl;
	const float *ml = a.ws + (size_t)a.T * a.nh * nsplit * kvl + 2 * base;
	/* This thread's first column of up to MPRE splits is loaded while the
	 * weights are computed (the sum below keeps its order: same bits). */
	const int c0 = blockIdx.z * blockDim.x + threadIdx.x;
	float pre[MPRE];
#pragma unroll
	for (int s = 0; s < MPRE; s++)
		pre[s] = s < nsplit && c0 < kvl ? part[(size_t)s * kvl + c0] : 0.0f;
	if (threadIdx.x < 32) {
		const int lane = threadIdx.x;
		float M = -INFINITY;
		for (int s = lane; s < nsplit; s += 32)
			M = fmaxf(M, ml[2 * s]);
		for (int o = 16; o; o >>= 1)
			M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
		float L = 0;
		for (int s = lane; s < nsplit; s += 32) {
			const float w = ml[2 * s] == -INFINITY ? 0.0f : expf(ml[2 * s] - M);
			wgt[s] = w;
			L += ml[2 * s + 1] * w;
		}
		for (int o = 16; o; o >>= 1)
			L += __shfl_xor_sync(0xffffffffu, L, o);
		const float inv = 1.0f / L;
		for (int s = lane; s < nsplit; s += 32)
			wgt[s] *= inv;
	}
	__syncthreads();
	for (int c = c0; c < kvl; c += gridDim.z * blockDim.x) {
		float v = 0;
		int s = 0;
		if (c == c0) {
#pragma unroll
			for (; s < MPRE; s++)
				if (s < nsplit)
					v += pre[s] * wgt[s];
		}
#pragma unroll 8
		for (; s < nsplit; s++)
			v += part[(size_t)s * kvl + c] * wgt[s];
		a.lat[((size_t)t * a.nh + h) * kvl + c] = __float2bfloat16(v);
	}
}

extern "C" int dsk_attn_splits(int T, int nh, int max_len, int sms)
{
	/* Enough blocks for several per SM (one is latency-bound), at least a
	 * tile of positions a split. */
	const int blocks = T * ((nh + HB - 1) / HB);
	int s = (4 * sms + blocks - 1) / blocks;
	const int most = (max_len + TILE - 1) / TILE;
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
	if (a->kvl % (8 * NW) || a->kvl > 8 * NW * MAXNT || kvd % 16 || a->nope % 4 || a->rope % 4)
		return ds_errf(e, -EINVAL, "mla_attention: kv_lora_rank %d + rope %d unsupported", a->kvl, a->rope);
	const int rows = a->list ? a->n_list : a->T;
	if (a->T <= 0 || rows <= 0)
		return 0;
	int chunk = (a->max_len + nsplit - 1) / nsplit;
	chunk = (chunk + TILE - 1) / TILE * TILE;
	const int ld = kvd + 8;
	const size_t smem = sizeof(dsk_bf16) * (size_t)(2 * HB + TILE) * ld + sizeof(float) * HB * TILE +
			    sizeof(dsk_bf16) * 2 * HB * (TILE + 8) + sizeof(float) * (3 * HB + 2) + sizeof(void *) * TILE;
	static int raised;
	if (!raised) {
		cudaFuncSetAttribute(attn_k, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024);
		raised = 1;
	}
	dim3 grid(rows, (a->nh + HB - 1) / HB, nsplit);
	dsk_launch(attn_k, grid, NW * 32, smem, s, *a, nsplit, chunk);
	int rc = dsk_check(e, "mla_attention");
	if (rc)
		return rc;
	dsk_launch(merge_k, dim3(rows, a->nh, (a->kvl + 127) / 128), 128, 0, s, *a, nsplit);
	return dsk_check(e, "mla_attention_merge");
}

/* ---- prefill through GEMMs (see attn.h) ---- */

static __global__ void kv_gather_k(dsk_kv_geom g, int layer, const int32_t *table, int kvd, dsk_bf16 *kc)
{
	dsk_pdl_enter();
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
	dsk_launch(kv_gather_k, len, 128, 0, s, *g, layer, table, kvd, kc);
	return dsk_check(e, "kv_gather");
}

static __global__ void qcat_k(dsk_bf16 *qc, const float *qabs, const float *q, int nh, int h0, int hc, int nope,
			      int rope, int kvl)
{
	dsk_pdl_enter();
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
	dsk_launch(qcat_k, n, 256, 0, s, qc, qabs, q, nh, h0, hc, nope, rope, kvl);
	return dsk_check(e, "qcat");
}

#define SM_MAXE 32
/* Row (h, i) of S [rows][len] float: softmax of scale*S over j <= p0+i,
 * written back as bf16 over the first half of the same row. */
static __global__ void causal_softmax_k(float *S, int len, int n, int p0, float scale)
{
	__shared__ float red[32];
	dsk_pdl_enter();
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
	dsk_launch(causal_softmax_k, rows, 256, 0, s, S, len, n, p0, scale);
	return dsk_check(e, "causal_softmax");
}
