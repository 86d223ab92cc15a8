/* moe_gemm.cu — grouped expert GEMMs (see moe_gemm.h).
 * Block tile 128 rows x 128 weight rows, k in steps of 64 through a 3-stage
 * cp.async ring (32 and 4 stages where K is not a multiple of 64); 8 warps
 * of 64 x 32 on mma.sync m16n8k16 (16 products per k16 step for 6
 * ldmatrix.x4). A block's rows come from blockIdx.y over the
 * experts' tile counts (ceil(rows / 128) each, prefix-summed in shared
 * memory from off). GLU: the 128 weight rows are 64 gate and 64 up rows
 * interleaved by 16, so each warp holds the gate and up products of the
 * same 16 output columns and applies SiLU(g) * u in registers. Shared rows
 * are their bytes + 16 apart (80 or 144): the 8 rows of an ldmatrix fall in
 * different banks. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/launch.cuh"
#include "kernels/mma.cuh"
#include "kernels/moe_gemm.h"

#define BM 128
#define BN 128
#define NT 256
#define MAXE 256

/* Weight row j (0 .. BN - 1) of the block's tile: its output column. */
template <int GLU> static __device__ __forceinline__ int wrow(int j, int c0, int *up)
{
	if (GLU) {
		*up = (j >> 4) & 1;
		return c0 + (j >> 5) * 16 + (j & 15);
	}
	*up = 0;
	return c0 + j;
}

/* FP8: e4m3 x and weights, BK = 128 (one scale block a stage): each
 * stage's products go to tmp and join acc scaled by the rows' activation
 * scales (staged in shared memory with the tile) and the weight block's. The
 * byte layout of a stage is the bf16 kernel's at BK = 64 (rows of 128 bytes,
 * 144 apart), and a k32 e4m3 step reads the fragments a k16 bf16 step does. */
template <int GLU, int BK, int ST, int FP8>
static __global__ void __launch_bounds__(NT, FP8 ? 1 : 2) moe_gemm_k(dsk_moe_gemm_args a)
{
	constexpr int EB = FP8 ? 1 : 2, RB = BK * EB, LD = RB + 16, CH = BM * RB / 16 / NT;
	extern __shared__ __align__(16) unsigned char gsm[];
	char *As = (char *)gsm, *Bs = As + ST * BM * LD;
	float *Ss = (float *)(Bs + ST * BN * LD); /* FP8: [ST][BM] activation scales */
	__shared__ int wsum[NT / 32], tile[3];
	dsk_pdl_enter();

	/* which expert and rows: tile t is the (t - first tile of e)-th of e */
	const int tid = threadIdx.x, lane = tid % 32, w = tid / 32;
	const int x = tid < a.E ? tid : -1;
	const int c = x >= 0 ? (a.off[x + 1] - a.off[x] + BM - 1) / BM : 0;
	int incl = c;
	for (int o = 1; o < 32; o <<= 1) {
		const int v = __shfl_up_sync(0xffffffffu, incl, o);
		if (lane >= o)
			incl += v;
	}
	if (lane == 31)
		wsum[w] = incl;
	__syncthreads();
	int before = 0, total = 0;
	for (int i = 0; i < NT / 32; i++) {
		before += i < w ? wsum[i] : 0;
		total += wsum[i];
	}
	incl += before;
	const int t = blockIdx.y;
	if (x >= 0 && c > 0 && t >= incl - c && t < incl) {
		tile[0] = a.off[x] + (t - (incl - c)) * BM;
		tile[1] = a.off[x + 1];
		tile[2] = x;
	}
	__syncthreads();
	if (t >= total)
		return;
	const int r0 = tile[0], r1 = tile[1], ex = tile[2];
	const int c0 = blockIdx.x * (GLU ? BN / 2 : BN);
	const char *W0 = (const char *)a.w0[ex], *W1 = GLU ? (const char *)a.w1[ex] : NULL;

	/* this thread's CH A and CH B chunks of 16 bytes a stage: rows
	 * tid / 8 + 32 i, bytes (tid % 8) * 16 of the stage's RB (computed
	 * in place: arrays of pointers cost the registers) */
	const size_t rowb = (size_t)a.K * EB;
	const int k16 = (tid % (RB / 16)) * 16, rt = tid / (RB / 16);
	const int KT = a.K / BK;
	int xrow[CH]; /* x row of each A chunk's row, -1: zeros */
#pragma unroll
	for (int i = 0; i < CH; i++) {
		const int pr = r0 + rt + i * (NT / (RB / 16));
		xrow[i] = pr >= r1 ? -1 : a.row_src ? a.row_src[pr] : pr;
	}
	/* FP8 with rows by index: this thread stages row r0 + tid's scale */
	const int srow = FP8 && a.row_src && tid < BM && r0 + tid < r1 ? a.row_src[r0 + tid] : -1;
	auto load = [&](int kt, int st) {
		char *as = As + st * BM * LD, *bs = Bs + st * BN * LD;
		const size_t kb = (size_t)kt * RB + k16;
#pragma unroll
		for (int i = 0; i < CH; i++) {
			const int r = rt + i * (NT / (RB / 16));
			const bool ok = xrow[i] >= 0;
			dsk_cp16(as + r * LD + k16, (const char *)a.x + (size_t)(ok ? xrow[i] : 0) * rowb + kb, ok);
			int up;
			const int n = wrow<GLU>(r, c0, &up);
			const bool nok = n < a.N;
			dsk_cp16(bs + r * LD + k16, (up ? W1 : W0) + (size_t)(nok ? n : 0) * rowb + kb, nok);
		}
		if (FP8 && a.row_src) { /* the rows' scales of k block kt, one a thread */
			if (tid < BM)
				dsk_cp4(Ss + st * BM + tid, a.xs + (size_t)kt * a.xs_ld + (srow >= 0 ? srow : 0), srow >= 0);
		} else if (FP8 && tid < BM / 4) { /* the same, 4 a chunk */
			const int rr = r0 + tid * 4;
			dsk_cp16(Ss + st * BM + tid * 4, a.xs + (size_t)kt * a.xs_ld + (rr < r1 ? rr : r0), rr < r1);
		}
	};
#pragma unroll
	for (int s = 0; s < ST - 1; s++) {
		if (s < KT)
			load(s, s);
		asm volatile("cp.async.commit_group;\n" ::);
	}

	const int wm = w / 4, wn = w % 4, g = lane / 4, q = lane % 4;
	float acc[4][4][4], tmp[FP8 ? 4 : 1][4][4];
#pragma unroll
	for (int i = 0; i < 4; i++)
#pragma unroll
		for (int j = 0; j < 4; j++)
			acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;
	/* the weight scales' rows: the block's weight rows sit in one 128-row block */
	const float *sw0 = FP8 ? a.s0[ex] + (size_t)(c0 / 128) * a.sld : NULL;
	const float *sw1 = FP8 && GLU ? a.s1[ex] + (size_t)(c0 / 128) * a.sld : NULL;
	for (int kt = 0; kt < KT; kt++) {
		asm volatile("cp.async.wait_group %0;\n" ::"n"(ST - 2));
		__syncthreads();
		if (kt + ST - 1 < KT)
			load(kt + ST - 1, (kt + ST - 1) % ST);
		asm volatile("cp.async.commit_group;\n" ::);
		const char *as = As + (kt % ST) * BM * LD, *bs = Bs + (kt % ST) * BN * LD;
		if (FP8) {
#pragma unroll
			for (int i = 0; i < 4; i++)
#pragma unroll
				for (int j = 0; j < 4; j++)
					tmp[i][j][0] = tmp[i][j][1] = tmp[i][j][2] = tmp[i][j][3] = 0.0f;
		}
		/* FP8: one k step at a time (unrolled, the four steps' fragments
		 * held at once spilled at 255 registers) */
#pragma unroll(FP8 ? 1 : RB / 32)
		for (int kk = 0; kk < RB / 32; kk++) {
			uint32_t af[4][4], bf[4][2];
#pragma unroll
			for (int mt = 0; mt < 4; mt++)
				dsk_ldsm_x4(af[mt], as + (wm * 64 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 32 +
							    (lane >> 4) * 16);
#pragma unroll
			for (int np = 0; np < 2; np++) {
				uint32_t r[4];
				dsk_ldsm_x4(r, bs + (wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 32 +
						       ((lane >> 3) & 1) * 16);
				bf[2 * np][0] = r[0];
				bf[2 * np][1] = r[1];
				bf[2 * np + 1][0] = r[2];
				bf[2 * np + 1][1] = r[3];
			}
#pragma unroll
			for (int mt = 0; mt < 4; mt++)
#pragma unroll
				for (int nt = 0; nt < 4; nt++) {
					if (FP8)
						dsk_mma_e4m3(tmp[FP8 ? mt : 0][nt], af[mt][0], af[mt][1], af[mt][2],
							     af[mt][3], bf[nt][0], bf[nt][1]);
					else
						dsk_mma_bf16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3],
							     bf[nt][0], bf[nt][1]);
				}
		}
		if (FP8) {
			const float *sa = Ss + (kt % ST) * BM;
			const float wg = sw0[kt], wu = GLU ? sw1[kt] : wg;
#pragma unroll
			for (int mt = 0; mt < 4; mt++) {
				const float s0 = sa[wm * 64 + mt * 16 + g], s1 = sa[wm * 64 + mt * 16 + g + 8];
#pragma unroll
				for (int nt = 0; nt < 4; nt++) {
					const float w = GLU && nt >= 2 ? wu : wg;
					acc[mt][nt][0] += tmp[FP8 ? mt : 0][nt][0] * s0 * w;
					acc[mt][nt][1] += tmp[FP8 ? mt : 0][nt][1] * s0 * w;
					acc[mt][nt][2] += tmp[FP8 ? mt : 0][nt][2] * s1 * w;
					acc[mt][nt][3] += tmp[FP8 ? mt : 0][nt][3] * s1 * w;
				}
			}
		}
	}
	asm volatile("cp.async.wait_group 0;\n" ::);

#pragma unroll
	for (int mt = 0; mt < 4; mt++) {
#pragma unroll
		for (int h = 0; h < 2; h++) {
			const int row = r0 + wm * 64 + mt * 16 + g + h * 8;
			if (row >= r1)
				continue;
			if (GLU) {
				dsk_bf16 *o = (dsk_bf16 *)a.out + (size_t)row * a.ldo;
#pragma unroll
				for (int nt = 0; nt < 2; nt++) {
					const int col = c0 + wn * 16 + nt * 8 + 2 * q;
					if (col >= a.N)
						continue;
					const float g0 = acc[mt][nt][2 * h], g1 = acc[mt][nt][2 * h + 1];
					const float u0 = acc[mt][nt + 2][2 * h], u1 = acc[mt][nt + 2][2 * h + 1];
					*(uint32_t *)(o + col) =
						dsk_pack_bf16(g0 / (1.0f + expf(-g0)) * u0, g1 / (1.0f + expf(-g1)) * u1);
				}
			} else {
				float *o = (float *)a.out + (size_t)row * a.ldo;
#pragma unroll
				for (int nt = 0; nt < 4; nt++) {
					const int col = c0 + wn * 32 + nt * 8 + 2 * q;
					if (col < a.N)
						*(float2 *)(o + col) = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
				}
			}
		}
	}
}

extern "C" int dsk_moe_gemm_ok(int E, int N, int K) { return E > 0 && E <= MAXE && N % 16 == 0 && K % 32 == 0; }

template <int GLU, int BK, int ST, int FP8> static void launch(const dsk_moe_gemm_args *a, dim3 grid, cudaStream_t s)
{
	const size_t smem = (size_t)ST * (BM + BN) * (BK * (FP8 ? 1 : 2) + 16) + (FP8 ? (size_t)ST * BM * 4 : 0);
	static size_t raised;
	if (smem > raised) {
		cudaFuncSetAttribute(moe_gemm_k<GLU, BK, ST, FP8>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
		raised = smem;
	}
	dsk_launch(moe_gemm_k<GLU, BK, ST, FP8>, grid, NT, smem, s, *a);
}

extern "C" int dsk_moe_gemm(const dsk_moe_gemm_args *a, int glu, dsk_stream s, ds_err *e)
{
	if (!dsk_moe_gemm_ok(a->E, a->N, a->K) || a->ldo % 2 ||
	    (a->fp8 && (a->K % 128 || !a->xs || a->xs_ld % 4 || (!a->row_src && a->max_rows > a->xs_ld))))
		return ds_errf(e, -EINVAL, "moe_gemm: %d experts of %dx%d (ldo %d) unsupported", a->E, a->N, a->K,
			       a->ldo);
	if (a->max_rows <= 0)
		return 0;
	/* column blocks fastest: the blocks resident together share their rows
	 * of x (in L2) and walk one expert's weights (the other order, every
	 * block another expert: the 4096-token prefill's experts 71 ms, 58 ms
	 * with cuBLASLt an expert, ~51 ms this way; H100) */
	const dim3 grid((unsigned)((a->N + (glu ? BN / 2 : BN) - 1) / (glu ? BN / 2 : BN)),
			(unsigned)((a->max_rows + BM - 1) / BM + a->E));
	/* k steps of 64 where K takes them (three stages: 108 KB, still two
	 * blocks an SM): half the barriers of 32-wide steps; H100, V2-Lite bf16
	 * prefill 4096 82.5 -> 79.0 ms (medians of 3, same call) */
	const int b64 = a->K % 64 == 0;
	if (a->fp8)
		glu ? launch<1, 128, 3, 1>(a, grid, s) : launch<0, 128, 3, 1>(a, grid, s);
	else if (glu)
		b64 ? launch<1, 64, 3, 0>(a, grid, s) : launch<1, 32, 4, 0>(a, grid, s);
	else
		b64 ? launch<0, 64, 3, 0>(a, grid, s) : launch<0, 32, 4, 0>(a, grid, s);
	return dsk_check(e, "moe_gemm");
}
