/* act.cu — SiLU(gate) * up into bf16 (see act.h). */
#include <cuda_runtime.h>

#include "kernels/act.h"

static __global__ void silu_mul_k(dsk_bf16 *h, const float *g, const float *u, size_t n)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n) {
		float a = g[i];
		h[i] = __float2bfloat16(a / (1.0f + expf(-a)) * u[i]);
	}
}

extern "C" int dsk_silu_mul(dsk_bf16 *h, const float *g, const float *u, int rows, int n, dsk_stream s, ds_err *e)
{
	size_t total = (size_t)rows * n;
	if (!total)
		return 0;
	silu_mul_k<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(h, g, u, total);
	return dsk_check(e, "silu_mul");
}
