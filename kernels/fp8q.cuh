/* fp8q.cuh — one 1x128 group of FP8 activation quantization, done by
 * 128 / N lanes with N values each (a warp with 4, a half warp with 8 for
 * 16-byte loads): scale = amax / 448, values e4m3 (saturating) of
 * v / scale. dsk_quant_fp8 and the norms' FP8 copy both use it, so the
 * GEMMs reading either get the same bits (any N: the amax is over the same
 * 128 values and each value converts alone). */
#ifndef DSK_FP8Q_CUH
#define DSK_FP8Q_CUH

#include <cuda_fp8.h>
#include <stdint.h>

/* Writes the lane's N bytes at dst unless NULL; returns the group's scale.
 * All 32 lanes of the warp call it (the shuffles). */
template <int N>
static __device__ __forceinline__ float dsk_fp8_group(const float (&v)[N], uint8_t *dst)
{
	static_assert(N == 4 || N == 8, "4 or 8 values a lane");
	float amax = 0;
	for (int i = 0; i < N; i++)
		amax = fmaxf(amax, fabsf(v[i]));
	for (int o = 64 / N; o; o >>= 1)
		amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
	const float s = fmaxf(amax, 1e-10f) / 448.0f;
	const float inv = 1.0f / s;
	uint32_t packed[N / 4] = {};
	for (int i = 0; i < N; i++) {
		__nv_fp8_e4m3 f(v[i] * inv);
		packed[i >> 2] |= (uint32_t)f.__x << (8 * (i & 3));
	}
	if (dst) {
		if (N == 4)
			*(uint32_t *)dst = packed[0];
		else
			*(uint2 *)dst = make_uint2(packed[0], packed[N / 4 - 1]);
	}
	return s;
}

#endif
