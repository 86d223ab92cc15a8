/* bench_util.h — what every benchmark here times and reports with: the
 * monotonic clock in seconds, a qsort comparator for doubles, and the median
 * (the mean of the middle two for an even count; sorts v in place). */
#ifndef DS_BENCH_UTIL_H
#define DS_BENCH_UTIL_H

#include <stdlib.h>
#include <time.h>

static inline double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static inline double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmpd);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif
