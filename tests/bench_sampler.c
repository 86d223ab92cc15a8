/* bench_sampler — the host sampler's cost per token (ds_sampler_probs: the
 * filtered distribution) on DeepSeek-V3's vocabulary, against the full sort
 * of the vocabulary it replaced (tests/sampler_ref.h), in the same run.
 * Two logit shapes: model-like (a few likely tokens, a long tail) and flat
 * (the nucleus spans most of the vocabulary: the selection's worst case).
 * Median of 5 runs of 10 rows each. Then a step's host-sampled rows as
 * the daemon's batcher draws them (daemon/batcher.c presample): 16
 * requests, each with its own sampler (repetition penalty 1.1, T 0.7, top-p
 * 0.95), one OpenMP thread against all of them. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/sampler.h"
#include "tests/bench_util.h"
#include "tests/sampler_ref.h"

enum { V = 129280, ROWS = 10, RUNS = 5 };

int main(void)
{
	float *l = malloc(sizeof(float) * V), *p = malloc(sizeof(float) * V);
	int32_t *order = malloc(sizeof(int32_t) * V);
	if (!l || !p || !order)
		return 1;
	const struct {
		const char *name;
		float t, top_p, min_p;
		int top_k;
	} cs[] = { { "T 1", 1, 1, 0, 0 },
		   { "T 1, top_p 0.9", 1, 0.9f, 0, 0 },
		   { "T 1, top_k 50", 1, 1, 0, 50 },
		   { "T 0.7, top_p 0.95, min_p 0.05", 0.7f, 0.95f, 0.05f, 0 } };
	printf("# ds_sampler_probs per token, vocabulary %d, median of %d x %d rows\n", V, RUNS, ROWS);
	printf("%-8s %-32s %12s %12s %8s\n", "logits", "settings", "select ms", "sort ms", "ratio");
	for (int shape = 0; shape < 2; shape++) {
		unsigned x = 99;
		for (int i = 0; i < V; i++) {
			x = x * 1103515245u + 12345u;
			const double u = ((x >> 8) & 0xffffff) / 16777216.0;
			l[i] = shape ? (float)(u * 12 - 6) : (float)(-4 * log(1 + 5000 * u));
		}
		for (size_t c = 0; c < sizeof(cs) / sizeof(cs[0]); c++) {
			ds_sampling sp;
			ds_sampling_default(&sp);
			sp.temperature = cs[c].t;
			sp.top_p = cs[c].top_p;
			sp.min_p = cs[c].min_p;
			sp.top_k = cs[c].top_k;
			ds_sampler *s;
			if (ds_sampler_new(&sp, V, &s))
				return 1;
			double a[RUNS], b[RUNS];
			for (int r = 0; r < RUNS; r++) {
				double t0 = now();
				for (int k = 0; k < ROWS; k++)
					ds_sampler_probs(s, l, p);
				a[r] = (now() - t0) / ROWS;
				t0 = now();
				for (int k = 0; k < ROWS; k++)
					ref_probs(&sp, l, V, p, order);
				b[r] = (now() - t0) / ROWS;
			}
			const double ma = median(a, RUNS), mb = median(b, RUNS);
			printf("%-8s %-32s %12.3f %12.3f %7.1fx\n", shape ? "flat" : "model", cs[c].name, ma * 1e3, mb * 1e3,
			       mb / ma);
			ds_sampler_free(s);
		}
	}
	/* one step's rows, parallel over requests */
	enum { NR = 16 };
	ds_sampler *rs[NR];
	float *pr = malloc(sizeof(float) * V * (size_t)omp_get_max_threads());
	if (!pr)
		return 1;
	for (int i = 0; i < NR; i++) {
		ds_sampling sp;
		ds_sampling_default(&sp);
		sp.temperature = 0.7f;
		sp.top_p = 0.95f;
		sp.repetition_penalty = 1.1f;
		sp.seed = (uint64_t)i;
		if (ds_sampler_new(&sp, V, &rs[i]))
			return 1;
		const int32_t seen[4] = { 5 + i, 900, 70000 + i, 12 };
		ds_sampler_add_prompt(rs[i], seen, 4);
	}
	const int maxt = omp_get_max_threads();
	printf("# a step's %d host-sampled rows (repetition penalty 1.1, T 0.7, top_p 0.95), median of %d\n", NR, RUNS);
	double ms1 = 0;
	for (int nt = 1; nt <= maxt; nt = nt < maxt ? (nt * 2 < maxt ? nt * 2 : maxt) : maxt + 1) {
		double a[RUNS];
		for (int r = 0; r < RUNS; r++) {
			double t0 = now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
			for (int i = 0; i < NR; i++) {
				float *q = pr + (size_t)omp_get_thread_num() * V;
				ds_sampler_probs(rs[i], l, q);
				ds_sampler_accept(rs[i], ds_sampler_draw(rs[i], q));
			}
			a[r] = now() - t0;
		}
		const double m = median(a, RUNS) * 1e3;
		if (nt == 1)
			ms1 = m;
		printf("%2d thread%s %10.3f ms a step %7.2fx\n", nt, nt > 1 ? "s" : " ", m, ms1 / m);
	}
	for (int i = 0; i < NR; i++)
		ds_sampler_free(rs[i]);
	free(pr);
	free(l);
	free(p);
	free(order);
	return 0;
}
