/* act.cu — SiLU(gate) * up into bf16 (see act.h). */
#include <cuda_runtime.h>

#include "kernels/act.h"
#include "kernels/launch.cuh"

static __global__ void silu_mul_k(dsk_bf16 *h, const float *g, const float *u, size_t n)
{
	dsk_pdl_enter();
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
	dsk_launch(silu_mul_k, (unsigned)((total + 255) / 256), 256, 0, s, h, g, u, total);
	return dsk_check(e, "silu_mul");
}
