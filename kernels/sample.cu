/* sample.cu — a token per row (see sample.h): a block per row.
 * Argmax: each thread scans a stride in increasing order, then a (value,
 * index) reduction that keeps the smaller index on ties. Draws: the row
 * becomes exp((l - max) / T) in place; top-k and top-p thresholds come from
 * a radix select over the (positive) floats' bits, 8 bits a pass, counting
 * for top-k and summing fixed-point mass for top-p; the draw is a scan of
 * fixed-point chunk masses in id order. */
#include <cuda_runtime.h>
#include <math.h>

#include "kernels/sample.h"
#include "kernels/launch.cuh"

#define NT 1024
#define FIX 1099511627776.0 /* 2^40: e in (0, 1] as an integer mass */

typedef unsigned long long u64;

static __device__ __forceinline__ void better(float *v, int *i, float v2, int i2)
{
	if (v2 > *v || (v2 == *v && i2 < *i)) {
		*v = v2;
		*i = i2;
	}
}

/* The row's (max, first index of the max) on every thread. */
static __device__ void row_argmax(const float *row, int V, float *pv, int *pi)
{
	__shared__ float sv[32];
	__shared__ int si[32];
	const int tid = threadIdx.x, nt = blockDim.x;
	/* A thread's first element seeds it, so an all -inf row gives 0. Rows
	 * of 16-byte vectors: a thread's four at a time, AU vectors' loads out
	 * at once and compared in index order after (one element a load, V =
	 * 102400 took 16 us at batch 1, ncu: a tenth of the small trained
	 * model's step). */
	enum { AU = 8 };
	float v;
	int idx;
	if (V % 4 == 0 && ((uintptr_t)row & 15) == 0) {
		v = 4 * tid < V ? row[4 * tid] : -INFINITY;
		idx = 4 * tid < V ? 4 * tid : V;
		const float4 *r4 = (const float4 *)row;
		const int n4 = V / 4;
		for (int c = tid; c < n4; c += AU * nt) {
			float4 x[AU];
#pragma unroll
			for (int u = 0; u < AU; u++)
				x[u] = c + u * nt < n4 ? r4[c + u * nt] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
#pragma unroll
			for (int u = 0; u < AU; u++) {
				const int i = 4 * (c + u * nt);
				if (x[u].x > v) {
					v = x[u].x;
					idx = i;
				}
				if (x[u].y > v) {
					v = x[u].y;
					idx = i + 1;
				}
				if (x[u].z > v) {
					v = x[u].z;
					idx = i + 2;
				}
				if (x[u].w > v) {
					v = x[u].w;
					idx = i + 3;
				}
			}
		}
	} else {
		v = tid < V ? row[tid] : -INFINITY;
		idx = tid < V ? tid : V;
		for (int c = tid + nt; c < V; c += nt) {
			const float x = row[c];
			if (x > v) {
				v = x;
				idx = c;
			}
		}
	}
	for (int o = 16; o; o >>= 1)
		better(&v, &idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
	if ((tid & 31) == 0) {
		sv[tid / 32] = v;
		si[tid / 32] = idx;
	}
	__syncthreads();
	if (tid < 32) {
		v = tid < nt / 32 ? sv[tid] : -INFINITY;
		idx = tid < nt / 32 ? si[tid] : V;
		for (int o = 16; o; o >>= 1)
			better(&v, &idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
		if (tid == 0) {
			sv[0] = v;
			si[0] = idx < V ? idx : 0;
		}
	}
	__syncthreads();
	*pv = sv[0];
	*pi = si[0];
	__syncthreads();
}

/* Block-wide sum of a u64 (the same tree every time). */
static __device__ u64 block_sum(u64 x)
{
	__shared__ u64 part[32];
	for (int o = 16; o; o >>= 1)
		x += __shfl_xor_sync(0xffffffffu, x, o);
	if ((threadIdx.x & 31) == 0)
		part[threadIdx.x / 32] = x;
	__syncthreads();
	if (threadIdx.x < 32) {
		x = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0;
		for (int o = 16; o; o >>= 1)
			x += __shfl_xor_sync(0xffffffffu, x, o);
		if (threadIdx.x == 0)
			part[0] = x;
	}
	__syncthreads();
	x = part[0];
	__syncthreads();
	return x;
}

/* The largest value v among row[i] >= lo such that the elements >= v
 * number at least `need` (by_mass 0) or hold at least `need` fixed-point
 * mass (by_mass 1); lo when no v reaches it. */
static __device__ float radix_select(const float *row, int V, float lo, u64 need, int by_mass)
{
	__shared__ u64 hist[256];
	__shared__ unsigned s_prefix;
	__shared__ u64 s_acc;
	unsigned prefix = 0, mask = 0;
	u64 acc = 0; /* count or mass above the current prefix */
	for (int shift = 24; shift >= 0; shift -= 8) {
		for (int b = threadIdx.x; b < 256; b += blockDim.x)
			hist[b] = 0;
		__syncthreads();
		for (int i = threadIdx.x; i < V; i += blockDim.x) {
			const float x = row[i];
			const unsigned bits = __float_as_uint(x);
			if (x >= lo && (bits & mask) == prefix)
				atomicAdd(&hist[(bits >> shift) & 255], by_mass ? (u64)((double)x * FIX) : 1ull);
		}
		__syncthreads();
		if (threadIdx.x == 0) {
			int bin = 255, last = -1;
			for (; bin >= 0; bin--) {
				if (hist[bin])
					last = bin;
				if (acc + hist[bin] >= need)
					break;
				acc += hist[bin];
			}
			if (bin < 0) /* not reached (rounding): keep all */
				bin = last < 0 ? 0 : last;
			s_prefix = prefix | ((unsigned)bin << shift);
			s_acc = acc;
		}
		__syncthreads();
		prefix = s_prefix;
		acc = s_acc;
		mask |= 255u << shift;
		__syncthreads();
	}
	const float v = __uint_as_float(prefix);
	return v > lo ? v : lo;
}

static __global__ void __launch_bounds__(NT) draw_k(int32_t *ids, float *logits, int V, int ld, const dsk_draw *draws)
{
	__shared__ u64 wsum[32];
	__shared__ int s_pick;
	dsk_pdl_enter();
	float *row = logits + (size_t)blockIdx.x * ld;
	const dsk_draw d = draws[blockIdx.x];
	const int tid = threadIdx.x, lane = tid & 31, w = tid / 32;
	float mx;
	int am;
	row_argmax(row, V, &mx, &am);
	if (!(d.temperature > 0)) {
		if (tid == 0)
			ids[blockIdx.x] = am;
		return;
	}
	u64 part = 0;
	for (int i = tid; i < V; i += NT) {
		const float x = expf((row[i] - mx) / d.temperature);
		row[i] = x;
		part += (u64)((double)x * FIX);
	}
	__syncthreads();
	const u64 total = block_sum(part);
	float tau = 0;
	if (d.top_k > 0 && d.top_k < V)
		tau = radix_select(row, V, 0.0f, (u64)d.top_k, 0);
	if (d.top_p < 1)
		tau = radix_select(row, V, tau, (u64)((double)d.top_p * (double)total), 1);
	if (d.min_p > 0 && d.min_p > tau) /* the most probable token's e is 1 */
		tau = d.min_p;
	/* Contiguous chunks per thread, so the scan runs in id order. */
	const int chunk = (V + NT - 1) / NT, c0 = tid * chunk, c1 = min(V, c0 + chunk);
	u64 mine = 0;
	for (int i = c0; i < c1; i++)
		if (row[i] >= tau)
			mine += (u64)((double)row[i] * FIX);
	/* exclusive scan of mine */
	u64 inc = mine;
	for (int o = 1; o < 32; o <<= 1) {
		const u64 y = __shfl_up_sync(0xffffffffu, inc, o);
		if (lane >= o)
			inc += y;
	}
	if (lane == 31)
		wsum[w] = inc;
	if (tid == 0)
		s_pick = -1;
	__syncthreads();
	if (w == 0) {
		u64 t = lane < NT / 32 ? wsum[lane] : 0, ti = t;
		for (int o = 1; o < 32; o <<= 1) {
			const u64 y = __shfl_up_sync(0xffffffffu, ti, o);
			if (lane >= o)
				ti += y;
		}
		if (lane < NT / 32)
			wsum[lane] = ti - t;
	}
	__syncthreads();
	const u64 before = wsum[w] + inc - mine, kept = block_sum(mine);
	const u64 target = (u64)((double)d.u * (double)kept);
	if (mine && target >= before && target < before + mine) {
		u64 c = before;
		for (int i = c0; i < c1; i++) {
			if (row[i] < tau)
				continue;
			c += (u64)((double)row[i] * FIX);
			if (target < c) {
				s_pick = i;
				break;
			}
		}
	}
	__syncthreads();
	if (tid == 0)
		ids[blockIdx.x] = s_pick >= 0 ? s_pick : am;
}

extern "C" int dsk_draw_rows(int32_t *ids, float *logits, int rows, int V, int ld, const dsk_draw *draws,
			     dsk_stream s, ds_err *e)
{
	if (rows <= 0 || V <= 0)
		return 0;
	dsk_launch(draw_k, rows, NT, 0, s, ids, logits, V, ld, draws);
	return dsk_check(e, "draw");
}
