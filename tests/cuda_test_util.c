/* cuda_test_util.c — see cuda_test_util.h. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>
#include <cuda_runtime_api.h>

#include "model/dtype.h"
#include "tests/cuda_test_util.h"

unsigned test_rng = 12345;
float frand(void)
{
	test_rng = test_rng * 1664525u + 1013904223u;
	return ((test_rng >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

void *dup_up(const void *h, size_t n)
{
	void *d = NULL;
	assert_int_equal(cudaMalloc(&d, n), cudaSuccess);
	if (h)
		assert_int_equal(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice), cudaSuccess);
	else
		assert_int_equal(cudaMemset(d, 0xff, n), cudaSuccess); /* poison: NaN floats */
	return d;
}
void down(void *h, const void *d, size_t n) { assert_int_equal(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost), cudaSuccess); }

/* Two device buffers hold the same n bytes (bit-identity of two paths). */
void dev_equal(const void *d1, const void *d2, size_t n)
{
	unsigned char *a = malloc(n), *b = malloc(n);
	down(a, d1, n);
	down(b, d2, n);
	assert_memory_equal(a, b, n);
	free(a);
	free(b);
}

void free_all(void *const *d, size_t n)
{
	for (size_t i = 0; i < n; i++)
		cudaFree(d[i]);
}

double rel_err(const float *a, const float *b, size_t n)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		double d = (double)a[i] - b[i];
		if (isnan(a[i]))
			return INFINITY;
		num += d * d;
		den += (double)b[i] * b[i];
	}
	return sqrt(num / (den > 0 ? den : 1));
}

/* A random weight [N][K] on the host: bf16 ~ N(0)/sqrt(K), or FP8 bytes that
 * are not NaN with block scales ~1/(448 sqrt K), sh [N/128][K/128] and the
 * same in rows padded to 4 (the device layout) in shp. */
void rand_host_weight(int fp8, int N, int K, void *wh, float *sh, float *shp)
{
	const int sr = (N + 127) / 128, sc = (K + 127) / 128, sld = (sc + 3) & ~3;
	for (int i = 0; i < sr * sc; i++) {
		sh[i] = (0.5f + (frand() + 1)) / 448.0f / sqrtf((float)K);
		shp[(i / sc) * sld + i % sc] = sh[i];
	}
	for (size_t i = 0; i < (size_t)N * K; i++) {
		if (fp8) {
			uint8_t v;
			do {
				test_rng = test_rng * 1664525u + 1013904223u;
				v = (uint8_t)(test_rng >> 24);
			} while ((v & 0x7f) == 0x7f);
			((uint8_t *)wh)[i] = v;
		} else {
			((uint16_t *)wh)[i] = ds_f32_to_bf16(frand() / sqrtf((float)K));
		}
	}
}

/* Random bf16 values frand() * amp: bits in h, device copy returned. */
uint16_t *rand_bf16(uint16_t *h, size_t n, float amp)
{
	for (size_t i = 0; i < n; i++)
		h[i] = ds_f32_to_bf16(frand() * amp);
	return dup_up(h, 2 * n);
}
