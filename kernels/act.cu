/* act.cu — SiLU(gate) * up into bf16 (see act.h). */
#include <cuda_runtime.h>

#include "kernels/act.h"
#include "kernels/launch.cuh"

static __global__ void silu_mul_k(dsk_bf16 *h, const float *g, const float *u, size_t n, const int32_t *rows, int dim)
{
	dsk_pdl_enter();
	if (rows)
		n = (size_t)*rows * dim;
	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		float a = g[i];
		h[i] = __float2bfloat16(a / (1.0f + expf(-a)) * u[i]);
	}
}

extern "C" int dsk_silu_mul(dsk_bf16 *h, const float *g, const float *u, int rows, int n, dsk_stream s, ds_err *e)
{
	size_t total = (size_t)rows * n;
	if (!total)
		return 0;
	dsk_launch(silu_mul_k, (unsigned)((total + 255) / 256), 256, 0, s, h, g, u, total, (const int32_t *)NULL, n);
	return dsk_check(e, "silu_mul");
}

extern "C" int dsk_silu_mul_dev(dsk_bf16 *h, const float *g, const float *u, const int32_t *rows, int max_rows, int n,
				dsk_stream s, ds_err *e)
{
	size_t total = (size_t)max_rows * n;
	if (!total)
		return 0;
	/* A grid for the usual few rows; larger counts loop. */
	unsigned blocks = (unsigned)((total + 255) / 256);
	if (blocks > 1024)
		blocks = 1024;
	dsk_launch(silu_mul_k, blocks, 256, 0, s, h, g, u, total, rows, n);
	return dsk_check(e, "silu_mul");
}
