#include "model/dtype.h"

#include <math.h>
#include <pthread.h>

static const struct {
	const char *name;
	ds_dtype t;
	size_t size;
} dtypes[] = {
	{ "F32", DS_DT_F32, 4 },   { "F16", DS_DT_F16, 2 },
	{ "BF16", DS_DT_BF16, 2 }, { "F8_E4M3", DS_DT_F8_E4M3, 1 },
	{ "I64", DS_DT_I64, 8 },   { "I32", DS_DT_I32, 4 },
	{ "U8", DS_DT_U8, 1 },
};

ds_dtype ds_dtype_from_name(const char *name, size_t len)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (strlen(dtypes[i].name) == len && memcmp(dtypes[i].name, name, len) == 0)
			return dtypes[i].t;
	return DS_DT_INVALID;
}

const char *ds_dtype_name(ds_dtype t)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (dtypes[i].t == t)
			return dtypes[i].name;
	return "INVALID";
}

size_t ds_dtype_size(ds_dtype t)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (dtypes[i].t == t)
			return dtypes[i].size;
	return 0;
}

float ds_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h >> 15) << 31;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t man = h & 0x3ff;
	float f;
	if (exp == 0) {
		f = ldexpf((float)man, -24);
		return sign ? -f : f;
	}
	uint32_t u;
	if (exp == 31)
		u = sign | 0x7f800000u | (man << 13);
	else
		u = sign | ((exp + 112) << 23) | (man << 13);
	memcpy(&f, &u, 4);
	return f;
}

float ds_fp8e4m3_to_f32(uint8_t v)
{
	int sign = v >> 7;
	int exp = (v >> 3) & 0xf;
	int man = v & 7;
	float f;
	if (exp == 0xf && man == 7)
		return NAN;
	if (exp == 0)
		f = ldexpf((float)man / 8.0f, -6);
	else
		f = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
	return sign ? -f : f;
}

float ds_fp8e4m3_lut[256];
static pthread_once_t lut_once = PTHREAD_ONCE_INIT;

static void lut_fill(void)
{
	for (int i = 0; i < 256; i++)
		ds_fp8e4m3_lut[i] = ds_fp8e4m3_to_f32((uint8_t)i);
}

void ds_dtype_init(void)
{
	pthread_once(&lut_once, lut_fill);
}
