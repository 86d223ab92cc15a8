/* flash.cu — causal prefill attention in one kernel (see flash.h).
 * A block of 4 warps takes 64 queries of one head, 16 a warp, their queries
 * held as mma A fragments; per tile of 64 keys (cp.async into one of two
 * shared-memory stages while the other is used): S = Q K^T on the tensor
 * cores, the causal mask on the tiles that cross the diagonal, the online
 * softmax in registers (each row's max and sum kept by the 4 lanes that
 * hold it), and O += P V with P taken from S's accumulators as the A
 * operand, as a bf16 pair hi + lo (two products: P in one bf16 rounding
 * lost the FP8 test model 2 of 73 top-1 tokens against the CPU; the pair
 * costs the kernel 16 % and a 4096-token V2-Lite prefill 1.4 %, H100).
 * Against the GEMM path (scores in memory, a softmax pass, the
 * latent sum and W_UV after it) this never writes the n x len scores and
 * sums values 128 wide instead of the latent's 512. Rows are padded by 8
 * elements in shared memory so the 8 rows an ldmatrix reads fall in
 * different banks. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/flash.h"
#include "kernels/launch.cuh"
#include "kernels/mma.cuh"

#define BM 64 /* queries a block, 16 a warp */
#define BN 64 /* keys a tile */
#define NT 128

/* (x, y) as a bf16 pair hi + lo: ~16 mantissa bits. */
static __device__ __forceinline__ void split_bf16x2(float x, float y, uint32_t *hi, uint32_t *lo)
{
	__nv_bfloat162 h = __floats2bfloat162_rn(x, y);
	const float2 f = __bfloat1622float2(h);
	*hi = *(uint32_t *)&h;
	*lo = dsk_pack_bf16(x - f.x, y - f.y);
}

template <int NOPE, int ROPE, int VD> struct fl {
	static constexpr int QK = NOPE + ROPE, KLD = QK + 8, VLD = VD + 8, KVW = NOPE + VD;
	static constexpr int STAGE = BN * KLD + BN * VLD; /* elements */
};

/* Keys j0 .. j0 + BN - 1 of one head into a stage: rows of nope from kv and
 * rope from kpe side by side, then the values; rows past len zero-filled. */
template <int NOPE, int ROPE, int VD>
static __device__ __forceinline__ void load_tile(dsk_bf16 *st, const dsk_flash_args &a, const dsk_bf16 *kvh, int j0)
{
	using F = fl<NOPE, ROPE, VD>;
	dsk_bf16 *ks = st, *vs = st + BN * F::KLD;
#pragma unroll
	for (int c = threadIdx.x; c < BN * (F::QK / 8); c += NT) {
		const int r = c / (F::QK / 8), col = c % (F::QK / 8) * 8, j = j0 + r;
		const bool ok = j < a.len;
		const size_t jj = ok ? j : 0;
		const dsk_bf16 *src = col < NOPE ? kvh + jj * F::KVW + col : a.kpe + jj * a.kpe_ld + (col - NOPE);
		dsk_cp16(ks + r * F::KLD + col, src, ok);
	}
#pragma unroll
	for (int c = threadIdx.x; c < BN * (VD / 8); c += NT) {
		const int r = c / (VD / 8), col = c % (VD / 8) * 8, j = j0 + r;
		const bool ok = j < a.len;
		dsk_cp16(vs + r * F::VLD + col, kvh + (size_t)(ok ? j : 0) * F::KVW + NOPE + col, ok);
	}
}

template <int NOPE, int ROPE, int VD> static __global__ void __launch_bounds__(NT, 2) flash_k(dsk_flash_args a)
{
	using F = fl<NOPE, ROPE, VD>;
	constexpr int KS = F::QK / 16, NS = BN / 8, NV = VD / 8;
	extern __shared__ __align__(16) unsigned char fl_smem[];
	dsk_bf16 *sm = (dsk_bf16 *)fl_smem;
	/* the longest rows (the last queries) first: causal work grows with i */
	const int i0 = (gridDim.x - 1 - blockIdx.x) * BM, h = blockIdx.y;
	const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, qd = lane % 4;
	const dsk_bf16 *kvh = a.kv + (size_t)h * a.len * F::KVW;
	const int kend = min(a.len, a.p0 + i0 + BM), nkt = (kend + BN - 1) / BN;
	dsk_pdl_enter();

	/* the block's queries through the second stage, the first tile into the first */
	dsk_bf16 *qs = sm + F::STAGE;
#pragma unroll
	for (int c = threadIdx.x; c < BM * (F::QK / 8); c += NT) {
		const int r = c / (F::QK / 8), col = c % (F::QK / 8) * 8;
		const bool ok = i0 + r < a.n;
		dsk_cp16(qs + r * F::KLD + col, a.q + (size_t)(ok ? i0 + r : 0) * a.q_ld + h * F::QK + col, ok);
	}
	load_tile<NOPE, ROPE, VD>(sm, a, kvh, 0);
	asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
	__syncthreads();
	uint32_t qf[KS][4];
#pragma unroll
	for (int k = 0; k < KS; k++)
		dsk_ldsm_x4(qf[k], qs + (w * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * F::KLD + k * 16 + (lane >> 4) * 8);
	__syncthreads();

	float o[NV][4];
#pragma unroll
	for (int v = 0; v < NV; v++)
		o[v][0] = o[v][1] = o[v][2] = o[v][3] = 0.0f;
	float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
	const float sl2 = a.scale * 1.4426950408889634f; /* exp(x) = exp2(x log2 e) */
	const int r0 = i0 + w * 16 + g, pos0 = a.p0 + r0, pos1 = pos0 + 8;
	for (int kt = 0; kt < nkt; kt++) {
		if (kt + 1 < nkt) {
			load_tile<NOPE, ROPE, VD>(sm + ((kt + 1) & 1) * F::STAGE, a, kvh, (kt + 1) * BN);
			asm volatile("cp.async.commit_group;\ncp.async.wait_group 1;\n" ::);
		} else {
			asm volatile("cp.async.wait_group 0;\n" ::);
		}
		__syncthreads();
		const dsk_bf16 *ks = sm + (kt & 1) * F::STAGE, *vs = ks + BN * F::KLD;
		float s[NS][4];
#pragma unroll
		for (int j = 0; j < NS; j++)
			s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
		for (int k = 0; k < KS; k++) {
#pragma unroll
			for (int jp = 0; jp < NS / 2; jp++) {
				uint32_t b[4];
				dsk_ldsm_x4(b, ks + (jp * 16 + (lane & 7) + (lane >> 4) * 8) * F::KLD + k * 16 +
						       ((lane >> 3) & 1) * 8);
				dsk_mma_bf16(s[2 * jp], qf[k][0], qf[k][1], qf[k][2], qf[k][3], b[0], b[1]);
				dsk_mma_bf16(s[2 * jp + 1], qf[k][0], qf[k][1], qf[k][2], qf[k][3], b[2], b[3]);
			}
		}
		const int j0 = kt * BN;
		const bool diag = j0 + BN - 1 > a.p0 + i0;
		float x0 = m0, x1 = m1;
#pragma unroll
		for (int j = 0; j < NS; j++) {
#pragma unroll
			for (int e = 0; e < 4; e++) {
				const int key = j0 + j * 8 + 2 * qd + (e & 1);
				s[j][e] = diag && key > (e < 2 ? pos0 : pos1) ? -INFINITY : s[j][e] * sl2;
			}
			x0 = fmaxf(x0, fmaxf(s[j][0], s[j][1]));
			x1 = fmaxf(x1, fmaxf(s[j][2], s[j][3]));
		}
		x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
		x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
		x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
		x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
		/* key 0 is in every row's first tile, so the maxima are finite */
		const float al0 = exp2f(m0 - x0), al1 = exp2f(m1 - x1);
		m0 = x0;
		m1 = x1;
		float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
		for (int j = 0; j < NS; j++) {
			s[j][0] = exp2f(s[j][0] - x0);
			s[j][1] = exp2f(s[j][1] - x0);
			s[j][2] = exp2f(s[j][2] - x1);
			s[j][3] = exp2f(s[j][3] - x1);
			sum0 += s[j][0] + s[j][1];
			sum1 += s[j][2] + s[j][3];
		}
		l0 = l0 * al0 + sum0; /* this lane's share of the row sums */
		l1 = l1 * al1 + sum1;
#pragma unroll
		for (int v = 0; v < NV; v++) {
			o[v][0] *= al0;
			o[v][1] *= al0;
			o[v][2] *= al1;
			o[v][3] *= al1;
		}
#pragma unroll
		for (int k = 0; k < BN / 16; k++) {
			uint32_t ah[4], al[4];
			split_bf16x2(s[2 * k][0], s[2 * k][1], &ah[0], &al[0]);
			split_bf16x2(s[2 * k][2], s[2 * k][3], &ah[1], &al[1]);
			split_bf16x2(s[2 * k + 1][0], s[2 * k + 1][1], &ah[2], &al[2]);
			split_bf16x2(s[2 * k + 1][2], s[2 * k + 1][3], &ah[3], &al[3]);
#pragma unroll
			for (int dp = 0; dp < NV / 2; dp++) {
				uint32_t b[4];
				dsk_ldsm_x4_t(b, vs + (k * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * F::VLD + dp * 16 +
							 (lane >> 4) * 8);
				dsk_mma_bf16(o[2 * dp], ah[0], ah[1], ah[2], ah[3], b[0], b[1]);
				dsk_mma_bf16(o[2 * dp + 1], ah[0], ah[1], ah[2], ah[3], b[2], b[3]);
				dsk_mma_bf16(o[2 * dp], al[0], al[1], al[2], al[3], b[0], b[1]);
				dsk_mma_bf16(o[2 * dp + 1], al[0], al[1], al[2], al[3], b[2], b[3]);
			}
		}
		__syncthreads(); /* the stage is refilled next iteration */
	}
	l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
	l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
	l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
	l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
	const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
	dsk_bf16 *out = a.o + (size_t)r0 * a.o_ld + h * VD + 2 * qd;
#pragma unroll
	for (int v = 0; v < NV; v++) {
		if (r0 < a.n)
			*(uint32_t *)(out + v * 8) = dsk_pack_bf16(o[v][0] * inv0, o[v][1] * inv0);
		if (r0 + 8 < a.n)
			*(uint32_t *)(out + (size_t)8 * a.o_ld + v * 8) = dsk_pack_bf16(o[v][2] * inv1, o[v][3] * inv1);
	}
}

template <int NOPE, int ROPE, int VD> static int launch(const dsk_flash_args *a, dsk_stream s, ds_err *e)
{
	const size_t smem = 2 * fl<NOPE, ROPE, VD>::STAGE * sizeof(dsk_bf16);
	static size_t raised;
	if (smem > raised) {
		cudaFuncSetAttribute(flash_k<NOPE, ROPE, VD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
		raised = smem;
	}
	dsk_launch(flash_k<NOPE, ROPE, VD>, dim3((a->n + BM - 1) / BM, a->nh), NT, smem, s, *a);
	return dsk_check(e, "flash_prefill");
}

#define SHAPES(X) X(128, 64, 128) X(32, 16, 32) X(32, 32, 32)

extern "C" int dsk_flash_ok(int nope, int rope, int vd)
{
#define OK(N, R, V) if (nope == N && rope == R && vd == V) return 1;
	SHAPES(OK)
#undef OK
	return 0;
}

extern "C" int dsk_flash_prefill(const dsk_flash_args *a, dsk_stream s, ds_err *e)
{
	if (a->n <= 0 || a->nh <= 0)
		return 0;
	if (a->len < a->p0 + a->n || a->p0 < 0)
		return ds_errf(e, -EINVAL, "flash_prefill: %d keys for %d queries from position %d", a->len, a->n,
			       a->p0);
#define RUN(N, R, V)                                      \
	if (a->nope == N && a->rope == R && a->vd == V) \
		return launch<N, R, V>(a, s, e);
	SHAPES(RUN)
#undef RUN
	return ds_errf(e, -ENOTSUP, "flash_prefill: no kernel for head dims %d + %d, values %d", a->nope, a->rope,
		       a->vd);
}
