/* dtype.h — the tensor element types dsd reads from safetensors and the
 * scalar conversions between them (bf16/f16/fp8-e4m3 to float32).
 * Pure functions; any thread. */
#ifndef DS_DTYPE_H
#define DS_DTYPE_H

#include <stdint.h>
#include <string.h>

typedef enum ds_dtype {
	DS_DT_INVALID = 0,
	DS_DT_F32 = 1,
	DS_DT_F16 = 2,
	DS_DT_BF16 = 3,
	DS_DT_F8_E4M3 = 4,
	DS_DT_I64 = 5,
	DS_DT_I32 = 6,
	DS_DT_U8 = 7,
	DS_DT_COUNT
} ds_dtype;

/* "BF16" -> DS_DT_BF16; DS_DT_INVALID for names dsd does not know. */
ds_dtype ds_dtype_from_name(const char *name, size_t len);
const char *ds_dtype_name(ds_dtype t);
/* Bytes per element; 0 for DS_DT_INVALID. */
size_t ds_dtype_size(ds_dtype t);

static inline float ds_bf16_to_f32(uint16_t h)
{
	uint32_t u = (uint32_t)h << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* Round-to-nearest-even, NaN kept quiet. */
static inline uint16_t ds_f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1u);
	return (uint16_t)(u >> 16);
}

float ds_f16_to_f32(uint16_t h);
/* OCP FP8 E4M3FN: no infinities, 0x7f/0xff are NaN, max 448. */
float ds_fp8e4m3_to_f32(uint8_t v);
/* Table of all 256 fp8 values, for hot loops. */
extern float ds_fp8e4m3_lut[256];
void ds_dtype_init(void);

#endif
