/* bench_util.h — what every benchmark here times and reports with: the
 * monotonic clock in seconds, a qsort comparator for doubles, the median
 * (the mean of the middle two for an even count; sorts v in place), and
 * comma lists of sizes ("1,8,64") from the command line or environment. */
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

/* The positive integers of "1,8,64" into out (at most cap); their count. */
static inline int parse_ints(const char *s, int *out, int cap)
{
	int n = 0;
	for (char *end; *s && n < cap; s = *end ? end + 1 : end) {
		long v = strtol(s, &end, 10);
		if (end == s)
			break;
		if (v > 0)
			out[n++] = (int)v;
	}
	return n;
}

#endif
