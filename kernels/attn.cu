/* attn.cu — split-KV absorbed MLA attention (see attn.h).
 * A block of NW warps (4 or 8) serves one token, 16 heads and one KV range,
 * on the tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulators):
 * the 16 heads' absorbed queries are the A operand of both products, so the
 * cache is read once per 16 heads. Per tile of 32 positions: warp w takes
 * 1/NW of the kv_lora_rank + rope columns for all 32 positions (its queries
 * stay in registers) and the warps' partial scores are summed in shared
 * memory; the online softmax runs a head per lane group, and warp w
 * accumulates latent columns kvl/NW * w .. for all heads (lat += P C, the
 * cache's fragments by ldmatrix.trans). Queries and probabilities enter as
 * a bf16 pair (hi + lo, two products each), which keeps them to ~16
 * mantissa bits: single bf16 rounding doubled the decode-vs-prefill
 * difference on the random test models. Cache tiles arrive by cp.async
 * into two buffers: the next tile streams in while one is used. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/attn.h"
#include "kernels/launch.cuh"
#include "kernels/mma.cuh"

#define HB 16    /* heads per block: the mma's M */
#define TILE 32  /* positions per iteration */
/* NW warps a block (4, or 8 for grids of at most a block an SM, where a
 * block's chain of dependent instructions is the time: ncu, V2-Lite batch
 * 1 at 1024, 32 blocks of one tile each, 9.4 us, stalled on fixed-latency
 * dependencies); MAXNT(NW) latent n-tiles of 8 per warp (kvl <= 512),
 * MAXKS(NW) k16 steps of the scores a warp holds queries for (kvl + rope
 * <= 576). */
#define MAXNT(NW) (64 / (NW))
#define MAXKS(NW) ((36 + (NW) - 1) / (NW))
#define RLD (TILE + 4) /* row stride of the partial scores */

static __device__ __forceinline__ uint32_t ld32(const dsk_bf16 *p) { return *(const uint32_t *)p; }

/* x = hi + lo, both bf16. */
static __device__ __forceinline__ void split_bf16(float x, dsk_bf16 *hi, dsk_bf16 *lo)
{
	*hi = __float2bfloat16(x);
	*lo = __float2bfloat16(x - __bfloat162float(*hi));
}

static __device__ __forceinline__ uint32_t bf2(dsk_bf16 lo, dsk_bf16 hi)
{
	return (uint32_t)(*(const uint16_t *)&lo) | ((uint32_t)(*(const uint16_t *)&hi) << 16);
}

/* Row pointers of one tile's cache positions (j >= j1: the pool's start,
 * zero-filled by dsk_cp16). */
static __device__ __forceinline__ const dsk_bf16 *tile_row(const dsk_attn_args &a, const int32_t *table, int j, int j1,
							   int kvd)
{
	return j < j1 ? a.g.pool + (size_t)table[j / a.g.block_tokens] * a.g.block_stride +
				(size_t)a.layer * a.g.layer_stride + (size_t)(j % a.g.block_tokens) * kvd
		      : a.g.pool;
}

template <int NW>
static __global__ void __launch_bounds__(NW * 32) attn_k(dsk_attn_args a, int nsplit, int chunk)
{
	enum { MAXNT = MAXNT(NW), MAXKS = MAXKS(NW) };
	extern __shared__ __align__(16) unsigned char smem_raw[];
	const int kvl = a.kvl, kvd = a.kvl + a.rope, qk = a.nope + a.rope, ld = kvd + 8; /* +8: no bank conflicts */
	dsk_bf16 *ks = (dsk_bf16 *)smem_raw;                 /* [2][TILE][ld] cache rows, double-buffered */
	float *red = (float *)(ks + 2 * TILE * ld);          /* [NW][HB][RLD] partial scores */
	dsk_bf16 *ps = (dsk_bf16 *)(red + NW * HB * RLD);    /* [HB][TILE + 8] probabilities, hi */
	dsk_bf16 *pl = ps + HB * (TILE + 8);                 /* lo */
	float *mrow = (float *)(pl + HB * (TILE + 8));       /* [HB] running max, sum, rescale */
	float *lrow = mrow + HB, *alpha = lrow + HB;
	const dsk_bf16 **rowp = (const dsk_bf16 **)(alpha + HB + 2); /* [2][TILE] (8-byte aligned) */
	const int t = a.list ? a.list[blockIdx.x] : blockIdx.x, h0 = blockIdx.y * HB, split = blockIdx.z;
	const int tid = threadIdx.x, w = tid / 32, lane = tid & 31, g = lane >> 2, q = lane & 3;
	const int n = a.pos[t] + 1;
	const int j0 = split * chunk, j1 = min(n, j0 + chunk);
	const int32_t *table = a.g.tables + (size_t)a.seq[t] * a.g.max_blocks;
	const int ntw = kvl / 8 / NW; /* latent n-tiles per warp */
	/* The scores' k dimension is split over the warps (warp w: k16 steps
	 * w*pw ..), each holding its slice of the 16 heads' queries in
	 * registers as mma A fragments: read once, not once a tile per warp
	 * from shared memory (that traffic bounded a tile at ~2,000 cycles). */
	const int nks = kvd / 16, pw = (nks + NW - 1) / NW;

	/* Block tables are step inputs (kernels/launch.cuh): the first tiles'
	 * rows are looked up before the wait. */
	const int vec = kvd / 8; /* uint4 per row */
	if (tid < TILE) {
		rowp[tid] = tile_row(a, table, j0 + tid, j1, kvd);
		rowp[TILE + tid] = tile_row(a, table, j0 + TILE + tid, j1, kvd);
	}
	dsk_pdl_enter();
	__syncthreads();
	/* The first tile starts arriving before the queries load. */
	if (j0 < j1)
		for (int i = tid; i < TILE * vec; i += NW * 32) {
			const int r = i / vec, v = i % vec;
			dsk_cp16(ks + (size_t)r * ld + v * 8, rowp[r] + v * 8, j0 + r < j1);
		}
	asm volatile("cp.async.commit_group;\n" ::);
	uint32_t qh[MAXKS][4], qlo[MAXKS][4];
	{
		float2 v[MAXKS][4];
#pragma unroll
		for (int s = 0; s < MAXKS; s++)
#pragma unroll
			for (int r = 0; r < 4; r++) {
				const int k = (w * pw + s) * 16 + 2 * q + (r >> 1) * 8, hh = h0 + g + (r & 1) * 8;
				v[s][r] = make_float2(0, 0);
				if (s < pw && k < kvd && hh < a.nh)
					v[s][r] = k < kvl ? *(const float2 *)(a.qabs + ((size_t)t * a.nh + hh) * kvl + k)
							  : *(const float2 *)(a.q + ((size_t)t * a.nh + hh) * qk + a.nope + (k - kvl));
			}
#pragma unroll
		for (int s = 0; s < MAXKS; s++)
#pragma unroll
			for (int r = 0; r < 4; r++) {
				dsk_bf16 h0b, l0b, h1b, l1b;
				split_bf16(v[s][r].x, &h0b, &l0b);
				split_bf16(v[s][r].y, &h1b, &l1b);
				qh[s][r] = bf2(h0b, h1b);
				qlo[s][r] = bf2(l0b, l1b);
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

	for (int jt = j0, it = 0; jt < j1; jt += TILE, it++) {
		const int buf = it & 1;
		const dsk_bf16 *kt = ks + (size_t)buf * TILE * ld;
		/* the next tile streams in while this one is used */
		if (jt + TILE < j1) {
			dsk_bf16 *kn = ks + (size_t)(buf ^ 1) * TILE * ld;
			const dsk_bf16 *const *rp = rowp + (buf ^ 1) * TILE;
			for (int i = tid; i < TILE * vec; i += NW * 32) {
				const int r = i / vec, v = i % vec;
				dsk_cp16(kn + (size_t)r * ld + v * 8, rp[r] + v * 8, jt + TILE + r < j1);
			}
		}
		asm volatile("cp.async.commit_group;\ncp.async.wait_group 1;\n" ::);
		__syncthreads();
		/* rowp[buf] was this tile's: the tile after next's now */
		if (tid < TILE && jt + 2 * TILE < j1)
			rowp[buf * TILE + tid] = tile_row(a, table, jt + 2 * TILE + tid, j1, kvd);
		/* Partial scores of warp w's k slice, all 32 positions. */
		{
			float c[TILE / 8][2][4] = {};
#pragma unroll
			for (int s = 0; s < MAXKS; s++) {
				const int k = (w * pw + s) * 16;
				if (s >= pw || k >= kvd)
					break;
#pragma unroll
				for (int nt = 0; nt < TILE / 8; nt++) {
					const dsk_bf16 *kb = kt + (nt * 8 + g) * ld + k + q * 2;
					const uint32_t b0 = ld32(kb), b1 = ld32(kb + 8);
					dsk_mma_bf16(c[nt][0], qh[s][0], qh[s][1], qh[s][2], qh[s][3], b0, b1);
					dsk_mma_bf16(c[nt][1], qlo[s][0], qlo[s][1], qlo[s][2], qlo[s][3], b0, b1);
				}
			}
			float *rw = red + (size_t)w * HB * RLD;
#pragma unroll
			for (int nt = 0; nt < TILE / 8; nt++) {
				const int p0 = nt * 8 + q * 2;
				*(float2 *)(rw + g * RLD + p0) = make_float2(c[nt][0][0] + c[nt][1][0], c[nt][0][1] + c[nt][1][1]);
				*(float2 *)(rw + (g + 8) * RLD + p0) =
					make_float2(c[nt][0][2] + c[nt][1][2], c[nt][0][3] + c[nt][1][3]);
			}
		}
		__syncthreads();
		/* Online softmax: warp w takes HB / NW heads side by side (their
		 * shuffles interleave), a lane per position; the warps' partial
		 * scores summed in warp order. */
		{
			enum { HW = HB / NW };
			float sv[HW], mt[HW], mn[HW], sum[HW];
#pragma unroll
			for (int hh = 0; hh < HW; hh++) {
				const int h = w * HW + hh;
				float d = 0;
#pragma unroll
				for (int x = 0; x < NW; x++)
					d += red[((size_t)x * HB + h) * RLD + lane];
				mt[hh] = sv[hh] = jt + lane < j1 ? d * a.scale : -INFINITY;
			}
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
		/* lat[16 heads][cols of warp w] = alpha * lat + P C; C's fragments
		 * by ldmatrix.trans, two n-tiles a load. */
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
			/* lane L names row L % 8 of matrix L / 8: positions +8 for
			 * odd matrices, the next n-tile for matrices 2 and 3 */
			const dsk_bf16 *kr = kt + (size_t)(kk + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
#pragma unroll
			for (int j = 0; j < MAXNT; j += 2) {
				if (j >= ntw)
					break;
				const int col = (w * ntw + j) * 8;
				uint32_t b[4];
				if (j + 1 < ntw) {
					dsk_ldsm_x4_t(b, kr + col);
				} else {
					dsk_ldsm_x2_t(b, kr + col);
					b[2] = b[3] = 0;
				}
				dsk_mma_bf16(acc[j], a0, a1, a2, a3, b[0], b[1]);
				dsk_mma_bf16(acc[j], l0, l1, l2, l3, b[0], b[1]);
				if (j + 1 < ntw) {
					dsk_mma_bf16(acc[j + 1], a0, a1, a2, a3, b[2], b[3]);
					dsk_mma_bf16(acc[j + 1], l0, l1, l2, l3, b[2], b[3]);
				}
			}
		}
		__syncthreads(); /* this buffer is refilled next iteration */
	}
	float *part = a.ws;
	float *ml = a.ws + (size_t)a.T * a.nh * nsplit * kvl;
#pragma unroll
	for (int j = 0; j < MAXNT; j++) {
		if (j >= ntw)
			break;
		const int col = (w * ntw + j) * 8 + q * 2;
		if (h0 + g < a.nh)
			*(float2 *)(part + (((size_t)t * a.nh + h0 + g) * nsplit + split) * kvl + col) =
				make_float2(acc[j][0], acc[j][1]);
		if (h0 + g + 8 < a.nh)
			*(float2 *)(part + (((size_t)t * a.nh + h0 + g + 8) * nsplit + split) * kvl + col) =
				make_float2(acc[j][2], acc[j][3]);
	}
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
	/* About two blocks an SM (what registers and shared memory let
	 * reside), at least a tile of positions a split: since a split's tiles
	 * stream double-buffered, fewer, longer splits beat more blocks
	 * (`test_cuda_ops --bench-attn`, docs/PERFORMANCE.md: batch 16 / 1024
	 * 16 splits 20.3 us against 28.6 at 32, batch 64 4-5 splits 56 against
	 * 65 at 8-9). */
	const int blocks = T * ((nh + HB - 1) / HB);
	int s = (2 * sms + blocks - 1) / blocks;
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

static size_t attn_smem(int nw, int kvd)
{
	const int ld = kvd + 8;
	return sizeof(dsk_bf16) * (size_t)2 * TILE * ld + sizeof(float) * nw * HB * RLD +
	       sizeof(dsk_bf16) * 2 * HB * (TILE + 8) + sizeof(float) * (3 * HB + 2) + sizeof(void *) * 2 * TILE;
}

template <int NW>
static bool attn_fits(const dsk_attn_args *a)
{
	const int kvd = a->kvl + a->rope;
	return a->kvl % (8 * NW) == 0 && a->kvl <= 8 * NW * MAXNT(NW) && kvd <= 16 * NW * MAXKS(NW);
}

template <int NW>
static void attn_launch(const dsk_attn_args *a, dim3 grid, int nsplit, int chunk, cudaStream_t s)
{
	const size_t smem = attn_smem(NW, a->kvl + a->rope);
	static size_t raised;
	if (smem > raised) {
		cudaFuncSetAttribute(attn_k<NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
		raised = smem;
	}
	dsk_launch(attn_k<NW>, grid, NW * 32, smem, s, *a, nsplit, chunk);
}

extern "C" int dsk_mla_attention(const dsk_attn_args *a, int nsplit, dsk_stream s, ds_err *e)
{
	const int kvd = a->kvl + a->rope;
	if (!attn_fits<4>(a) || kvd % 16 || a->nope % 4 || a->rope % 4)
		return ds_errf(e, -EINVAL, "mla_attention: kv_lora_rank %d + rope %d unsupported", a->kvl, a->rope);
	const int rows = a->list ? a->n_list : a->T;
	if (a->T <= 0 || rows <= 0)
		return 0;
	int chunk = (a->max_len + nsplit - 1) / nsplit;
	chunk = (chunk + TILE - 1) / TILE * TILE;
	dim3 grid(rows, (a->nh + HB - 1) / HB, nsplit);
	if ((long)grid.x * grid.y * grid.z <= dsk_sm_count() && attn_fits<8>(a))
		attn_launch<8>(a, grid, nsplit, chunk, s);
	else
		attn_launch<4>(a, grid, nsplit, chunk, s);
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

#define SM_MAXE 32
/* Row (h, i) of S [rows][len] float: softmax of scale*S over j <= p0+i,
 * written back as bf16 over the first half of the same row. */
static __global__ void __launch_bounds__(256) causal_softmax_k(float *S, int len, int n, int p0, float scale)
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
	/* As few threads a row as hold it: a row's time is its round trip and
	 * four barriers, so rows in flight set the pace (256 threads a row, a
	 * 4096-token prefill's passes took 114 us each, ~3.5x their bytes' time
	 * at the copy bandwidth; ncu, H100). */
	int nt = 64;
	while (nt < 256 && nt * SM_MAXE < len)
		nt *= 2;
	dsk_launch(causal_softmax_k, rows, nt, 0, s, S, len, n, p0, scale);
	return dsk_check(e, "causal_softmax");
}
