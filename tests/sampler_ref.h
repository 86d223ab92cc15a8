/* sampler_ref.h — the sampler's filters as a full sort of the vocabulary
 * computes them (model/sampler.c's earlier implementation): an independent
 * reference for test_sampler and the baseline of bench_sampler. probs and
 * order hold n entries. */
#ifndef DS_TEST_SAMPLER_REF_H
#define DS_TEST_SAMPLER_REF_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "model/sampler.h"

/* Order by probability, then id. */
static inline int ref_cmp(const void *a, const void *b, void *base_)
{
	const float *pr = base_;
	float x = pr[*(const int32_t *)a], y = pr[*(const int32_t *)b];
	if (x != y)
		return x > y ? -1 : 1;
	return *(const int32_t *)a - *(const int32_t *)b;
}

static inline void ref_probs(const ds_sampling *p, const float *l, int n, float *probs, int32_t *order)
{
	float m = l[0];
	for (int i = 1; i < n; i++)
		m = l[i] > m ? l[i] : m;
	double sum = 0;
	for (int i = 0; i < n; i++)
		sum += probs[i] = expf((l[i] - m) / p->temperature);
	for (int i = 0; i < n; i++)
		probs[i] = (float)(probs[i] / sum);
	if ((p->top_k > 0 && p->top_k < n) || p->top_p < 1) {
		for (int i = 0; i < n; i++)
			order[i] = i;
		qsort_r(order, (size_t)n, sizeof(int32_t), ref_cmp, probs);
		int keep = p->top_k > 0 && p->top_k < n ? p->top_k : n;
		double c = 0;
		for (int i = 0; p->top_p < 1 && i < keep; i++)
			if ((c += probs[order[i]]) >= p->top_p) {
				keep = i + 1;
				break;
			}
		for (int i = keep; i < n; i++)
			probs[order[i]] = 0;
	}
	if (p->min_p > 0) {
		float pmax = 0;
		for (int i = 0; i < n; i++)
			pmax = probs[i] > pmax ? probs[i] : pmax;
		for (int i = 0; i < n; i++)
			if (probs[i] < p->min_p * pmax)
				probs[i] = 0;
	}
	sum = 0;
	for (int i = 0; i < n; i++)
		sum += probs[i];
	for (int i = 0; i < n; i++)
		probs[i] = (float)(probs[i] / sum);
}

#endif
