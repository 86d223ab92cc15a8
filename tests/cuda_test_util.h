/* cuda_test_util.h — what the CUDA op tests share: a seeded generator
 * (test_rng, reseeded by tests that want the same values twice), device
 * buffers that fail the test on any CUDA error (dup_up poisons a buffer
 * with 0xff bytes when given no host data: NaN floats, so unwritten output
 * shows), bit comparisons, and random weights in the device layouts. */
#ifndef DS_CUDA_TEST_UTIL_H
#define DS_CUDA_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

extern unsigned test_rng;
float frand(void); /* uniform in [-1, 1) */
void *dup_up(const void *h, size_t n);
void down(void *h, const void *d, size_t n);
/* Two device buffers hold the same n bytes (bit-identity of two paths). */
void dev_equal(const void *d1, const void *d2, size_t n);
void free_all(void *const *d, size_t n);
#define FREE_ALL(arr) free_all(arr, sizeof(arr) / sizeof(arr[0]))
double rel_err(const float *a, const float *b, size_t n);
/* A random weight [N][K] on the host: bf16 ~ N(0)/sqrt(K), or FP8 bytes that
 * are not NaN with block scales ~1/(448 sqrt K), sh [N/128][K/128] and the
 * same in rows padded to 4 (the device layout) in shp. */
void rand_host_weight(int fp8, int N, int K, void *wh, float *sh, float *shp);
/* Random bf16 values frand() * amp: bits in h, device copy returned. */
uint16_t *rand_bf16(uint16_t *h, size_t n, float amp);

#endif
