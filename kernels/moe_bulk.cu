/* moe_bulk.cu — the routed experts' bf16 GEMV for 1-2 rows an expert with
 * the weights streamed by bulk asynchronous copies (see gemv.h,
 * dsk_moe_gemv_bulk). moe_gemv_k keeps each lane's loads in registers:
 * ncu at V2-Lite's batch 1 showed it at 62 % of the DRAM bandwidth with
 * warps stalled on those loads, a round of loads a warp at a time. Here one
 * block an SM walks its tiles (8 outputs: their 8 weight rows, or 8 gate
 * and 8 up rows) through a ring of S shared-memory stages; thread 0 keeps
 * S - 1 tiles in flight with cp.async.bulk, completion counted in bytes on
 * each stage's mbarrier, so the bytes in flight no longer depend on
 * registers or on how far each warp has got. A warp dots its row from
 * shared memory in the k order of moe_gemv_k's lanes (lane l: k = 8 l +
 * 256 m), summed by the same shuffles: the same bits. */
#include <cuda_runtime.h>
#include <stdlib.h>

#include "kernels/gemv.h"
#include "kernels/launch.cuh"

#define BK_WARPS 8
#define BK_MAX_STAGES 6
#define BK_MAX_K 2048 /* a lane's activations in registers */
#define BK_SMEM (130 * 1024) /* the stage ring: two stages of V2-Lite's gate/up tiles */

static __device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

static __device__ __forceinline__ void mbar_init(uint64_t *b, int n)
{
	asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(b)), "r"(n) : "memory");
}

static __device__ __forceinline__ void mbar_expect(uint64_t *b, unsigned bytes)
{
	asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(b)), "r"(bytes)
		     : "memory");
}

static __device__ __forceinline__ void mbar_wait(uint64_t *b, unsigned parity)
{
	asm volatile("{\n\t.reg .pred p;\n"
		     "BK_WAIT%=:\n\t"
		     "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
		     "@!p bra BK_WAIT%=;\n}\n" ::"r"(smem_addr(b)),
		     "r"(parity)
		     : "memory");
}

/* bytes (a multiple of 16, both addresses 16-byte aligned) global -> shared,
 * counted on b. */
static __device__ __forceinline__ void bulk_load(void *dst, const void *src, unsigned bytes, uint64_t *b)
{
	asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
			     smem_addr(dst)),
		     "l"(src), "r"(bytes), "r"(smem_addr(b))
		     : "memory");
}

/* What a tile needs of its expert, gathered once a launch into shared
 * memory: read through act -> cnt/off/pointers -> row_src for every tile,
 * those dependent loads (a round trip each, in the issuing thread and in
 * every warp) took more time than the tile's bytes. */
template <int MR>
struct bk_expert {
	const dsk_bf16 *w[2];
	int c, r0, src[MR];
};

template <int MR>
static __device__ __forceinline__ void bk_issue(const bk_expert<MR> *ex, int t, int tpe, int glu, int N, int K,
						dsk_bf16 *st, uint64_t *b)
{
	const bk_expert<MR> &x = ex[t / tpe];
	const int n0 = (t % tpe) * BK_WARPS, rows = min(BK_WARPS, N - n0);
	const unsigned rb = (unsigned)rows * K * 2;
	mbar_expect(b, glu ? 2 * rb : rb);
	bulk_load(st, x.w[0] + (size_t)n0 * K, rb, b);
	if (glu)
		bulk_load(st + (size_t)BK_WARPS * K, x.w[1] + (size_t)n0 * K, rb, b);
}

/* Tile t: active expert t / tpe, outputs n0 = (t % tpe) * 8 ..; warp w
 * takes output n0 + w over the expert's rows MR at a time (more passes over
 * the stage for more rows, as moe_gemv_k over its registers), its
 * activations loaded before it waits for the stage. */
template <int MR, bool GLU>
static __global__ void __launch_bounds__(BK_WARPS * 32, 1) moe_bulk_k(dsk_moe_gemv_args a, int tpe, int S)
{
	enum { NR = GLU ? 2 : 1, KU = BK_MAX_K / 256 };
	extern __shared__ __align__(128) unsigned char bk_sm[];
	const int K = a.K, tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
	dsk_bf16 *ring = (dsk_bf16 *)bk_sm;
	const size_t stage = (size_t)NR * BK_WARPS * K;
	uint64_t *full = (uint64_t *)(ring + S * stage);
	bk_expert<MR> *ex = (bk_expert<MR> *)(full + S);
	if (tid == 0) {
		for (int s = 0; s < S; s++)
			mbar_init(&full[s], 1);
		asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
	}
	dsk_pdl_enter();
	const int na = a.act[0], total = na * tpe, G = gridDim.x;
	for (int e = tid; e < na; e += blockDim.x) {
		const int x = a.act[1 + e], r0 = a.off[x];
		ex[e].w[0] = (const dsk_bf16 *)a.wp[0][x];
		ex[e].w[1] = (const dsk_bf16 *)a.wp[GLU ? 1 : 0][x];
		ex[e].c = a.cnt[x];
		ex[e].r0 = r0;
#pragma unroll
		for (int j = 0; j < MR; j++)
			ex[e].src[j] = a.row_src ? a.row_src[r0 + j] : r0 + j; /* past c: unread */
	}
	__syncthreads();
	int mine = 0; /* this block's tiles: blockIdx.x + i G */
	if ((int)blockIdx.x < total)
		mine = (total - 1 - (int)blockIdx.x) / G + 1;
	if (tid == 0)
		for (int i = 0; i < S && i < mine; i++)
			bk_issue<MR>(ex, blockIdx.x + i * G, tpe, GLU, a.N, K, ring + i * stage, &full[i]);
	const dsk_bf16 *xb = (const dsk_bf16 *)a.x;
	for (int i = 0; i < mine; i++) {
		const int s = i % S, t = blockIdx.x + i * G;
		const bk_expert<MR> &x = ex[t / tpe];
		const int c = x.c, r0 = x.r0, n = (t % tpe) * BK_WARPS + w;
		const dsk_bf16 *rows[NR];
#pragma unroll
		for (int r = 0; r < NR; r++)
			rows[r] = ring + s * stage + (size_t)(r * BK_WARPS + w) * K;
		for (int c0 = 0; n < a.N && c0 < c; c0 += MR) {
			const int m = min(MR, c - c0);
			int src[MR];
#pragma unroll
			for (int j = 0; j < MR; j++)
				src[j] = c0 == 0 ? x.src[j] : j < m ? (a.row_src ? a.row_src[r0 + c0 + j] : r0 + c0 + j) : 0;
			uint4 xv[MR][KU];
#pragma unroll
			for (int q = 0; q < MR; q++)
#pragma unroll
				for (int u = 0; u < KU; u++) {
					const int k = lane * 8 + u * 256;
					xv[q][u] = q < m && k < K ? __ldg((const uint4 *)(xb + (size_t)src[q] * K + k))
								  : make_uint4(0, 0, 0, 0);
				}
			if (c0 == 0)
				mbar_wait(&full[s], (unsigned)(i / S) & 1);
			float acc[NR][MR];
#pragma unroll
			for (int j = 0; j < MR; j++)
				acc[0][j] = acc[NR - 1][j] = 0;
#pragma unroll
			for (int u = 0; u < KU; u++) {
				const int k = lane * 8 + u * 256;
				if (k >= K)
					break;
				float2 wf[NR][4];
#pragma unroll
				for (int r = 0; r < NR; r++) {
					const uint4 wv = *(const uint4 *)(rows[r] + k);
#pragma unroll
					for (int j = 0; j < 4; j++)
						wf[r][j] = __bfloat1622float2(((const __nv_bfloat162 *)&wv)[j]);
				}
#pragma unroll
				for (int q = 0; q < MR; q++)
					if (q < m) {
						const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)&xv[q][u];
#pragma unroll
						for (int j = 0; j < 4; j++) {
							const float2 xf = __bfloat1622float2(x2[j]);
#pragma unroll
							for (int r = 0; r < NR; r++)
								acc[r][q] += wf[r][j].x * xf.x + wf[r][j].y * xf.y;
						}
					}
			}
#pragma unroll
			for (int r = 0; r < NR; r++)
#pragma unroll
				for (int q = 0; q < MR; q++)
					for (int o = 16; o; o >>= 1)
						acc[r][q] += __shfl_xor_sync(0xffffffffu, acc[r][q], o);
			if (lane == 0)
#pragma unroll
				for (int q = 0; q < MR; q++)
					if (q < m) {
						const size_t at = (size_t)(r0 + c0 + q) * a.ldo + n;
						if (GLU) {
							const float g = acc[0][q], u = acc[NR - 1][q];
							((dsk_bf16 *)a.out)[at] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
						} else {
							((float *)a.out)[at] = acc[0][q];
						}
					}
		}
		__syncthreads(); /* stage s read by every warp */
		if (tid == 0 && i + S < mine)
			bk_issue<MR>(ex, blockIdx.x + (i + S) * G, tpe, GLU, a.N, K, ring + s * stage, &full[s]);
	}
}

template <int MR, bool GLU>
static void bk_launch(const dsk_moe_gemv_args *a, int tpe, int S, size_t smem, cudaStream_t s)
{
	static size_t raised;
	if (smem > raised) {
		cudaFuncSetAttribute(moe_bulk_k<MR, GLU>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
		raised = smem;
	}
	const long tiles = (long)tpe * a->max_active;
	const int grid = (int)(tiles < dsk_sm_count() ? tiles : dsk_sm_count());
	dsk_launch(moe_bulk_k<MR, GLU>, grid, BK_WARPS * 32, smem, s, *a, tpe, S);
}

/* dsk_moe_gemv takes this kernel for the gate/up pair of experts of one
 * row (batch 1, and steps where no expert gets two rows a pass), with a
 * ring of two 64 KB stages: 27-layer V2-Lite bf16 on an H200, ids ms, batch
 * 1 2.283-2.288 -> 2.254/2.262, batch 2 3.049-3.067 -> 2.982/2.984, batch 4
 * 4.421-4.437 -> 4.293/4.293. A 200 KB ring (three stages) gained less (batch
 * 1 2.296-2.302), the down projection lost (ncu, batch 1: 19.5 us against
 * 13.3 for moe_gemv_k: the per-tile chain of 8 warps, not the copies, sets
 * its pace), and so did two rows a pass (batch 8, gate/up 119 us against
 * 101): those stay on moe_gemv_k (docs/PERFORMANCE.md). */
extern "C" int dsk_moe_bulk_pick(const dsk_moe_gemv_args *a)
{
	return a->glu && a->max_rows <= 1;
}

extern "C" int dsk_moe_gemv_bulk(const dsk_moe_gemv_args *a, dsk_stream s, ds_err *e)
{
	static int off = -1;
	if (off < 0)
		off = getenv("DS_CUDA_MOE_BULK") && !atoi(getenv("DS_CUDA_MOE_BULK"));
	const size_t stage = (size_t)(a->glu ? 2 : 1) * BK_WARPS * a->K * 2;
	if (off || a->no_bulk || a->fp8 || a->max_rows > 2 || a->K % 8 || a->K > BK_MAX_K || 2 * stage > BK_SMEM)
		return -ENOTSUP;
	if (a->max_active <= 0)
		return 0;
	int S = (int)(BK_SMEM / stage);
	S = S > BK_MAX_STAGES ? BK_MAX_STAGES : S;
	const size_t smem = S * stage + S * sizeof(uint64_t) + (size_t)a->max_active * sizeof(bk_expert<2>);
	const int tpe = (a->N + BK_WARPS - 1) / BK_WARPS;
	if (a->max_rows <= 1)
		a->glu ? bk_launch<1, true>(a, tpe, S, smem, s) : bk_launch<1, false>(a, tpe, S, smem, s);
	else
		a->glu ? bk_launch<2, true>(a, tpe, S, smem, s) : bk_launch<2, false>(a, tpe, S, smem, s);
	return dsk_check(e, "moe_gemv_bulk");
}
