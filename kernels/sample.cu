/* sample.cu — argmax per row (see sample.h): a block per row, each thread
 * scanning a stride in increasing order, then a (value, index) reduction
 * that keeps the smaller index on ties. */
#include <cuda_runtime.h>
#include <math.h>

#include "kernels/sample.h"

#define NT 512

static __device__ __forceinline__ void better(float *v, int *i, float v2, int i2)
{
	if (v2 > *v || (v2 == *v && i2 < *i)) {
		*v = v2;
		*i = i2;
	}
}

static __global__ void __launch_bounds__(NT) argmax_k(int32_t *ids, const float *logits, int V, int ld)
{
	__shared__ float sv[NT / 32];
	__shared__ int si[NT / 32];
	const float *row = logits + (size_t)blockIdx.x * ld;
	const int tid = threadIdx.x;
	/* A thread's first element seeds it, so an all -inf row gives 0. */
	float v = tid < V ? row[tid] : -INFINITY;
	int idx = tid < V ? tid : V;
	for (int c = tid + NT; c < V; c += NT) {
		const float x = row[c];
		if (x > v) {
			v = x;
			idx = c;
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
		v = tid < NT / 32 ? sv[tid] : -INFINITY;
		idx = tid < NT / 32 ? si[tid] : V;
		for (int o = 16; o; o >>= 1)
			better(&v, &idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
		if (tid == 0)
			ids[blockIdx.x] = idx < V ? idx : 0;
	}
}

extern "C" int dsk_argmax_rows(int32_t *ids, const float *logits, int rows, int V, int ld, dsk_stream s, ds_err *e)
{
	if (rows <= 0 || V <= 0)
		return 0;
	argmax_k<<<rows, NT, 0, s>>>(ids, logits, V, ld);
	return dsk_check(e, "argmax");
}
