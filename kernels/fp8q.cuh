/* fp8q.cuh — one 1x128 group of FP8 activation quantization, done by a warp
 * with 4 values a lane: scale = amax / 448, values e4m3 (saturating) of
 * v / scale. dsk_quant_fp8 and the norms' FP8 copy both use it, so the
 * GEMMs reading either get the same bits. */
#ifndef DSK_FP8Q_CUH
#define DSK_FP8Q_CUH

#include <cuda_fp8.h>
#include <stdint.h>

/* Writes the lane's 4 bytes at dst and returns the group's scale. */
static __device__ __forceinline__ float dsk_fp8_group(const float v[4], uint8_t *dst)
{
	float amax = 0;
	for (int i = 0; i < 4; i++)
		amax = fmaxf(amax, fabsf(v[i]));
	for (int o = 16; o; o >>= 1)
		amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
	const float s = fmaxf(amax, 1e-10f) / 448.0f;
	const float inv = 1.0f / s;
	uint32_t packed = 0;
	for (int i = 0; i < 4; i++) {
		__nv_fp8_e4m3 f(v[i] * inv);
		packed |= (uint32_t)f.__x << (8 * i);
	}
	*(uint32_t *)dst = packed;
	return s;
}

/* The same group by 16 lanes (a half warp) with 8 values each: the same
 * scale and bytes (amax over the same 128 values, the same conversions),
 * for 16-byte loads. Writes the lane's 8 bytes at dst unless NULL. */
static __device__ __forceinline__ float dsk_fp8_group8(const float v[8], uint8_t *dst)
{
	float amax = 0;
	for (int i = 0; i < 8; i++)
		amax = fmaxf(amax, fabsf(v[i]));
	for (int o = 8; o; o >>= 1)
		amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
	const float s = fmaxf(amax, 1e-10f) / 448.0f;
	const float inv = 1.0f / s;
	uint32_t packed[2] = { 0, 0 };
	for (int i = 0; i < 8; i++) {
		__nv_fp8_e4m3 f(v[i] * inv);
		packed[i >> 2] |= (uint32_t)f.__x << (8 * (i & 3));
	}
	if (dst)
		*(uint2 *)dst = make_uint2(packed[0], packed[1]);
	return s;
}

#endif
