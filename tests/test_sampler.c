/* Sampling: seeded determinism, greedy, each filter against a direct
 * computation of the distribution it must produce, penalties, and the
 * selection-based top-k/top-p against a full sort of a V3-sized vocabulary. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/sampler.h"
#include "tests/sampler_ref.h"

#define V 8
static const float base[V] = { 1.0f, 3.0f, 2.5f, -1.0f, 0.5f, 2.9f, 0.0f, -2.0f };

static int sample_once(const ds_sampling *p, float *l)
{
	ds_sampler *s;
	assert_int_equal(ds_sampler_new(p, V, &s), 0);
	int t = ds_sampler_sample(s, l);
	ds_sampler_free(s);
	return t;
}

static void test_greedy(void **st)
{
	(void)st;
	ds_sampling p;
	ds_sampling_default(&p);
	p.temperature = 0;
	float l[V];
	memcpy(l, base, sizeof(l));
	assert_int_equal(sample_once(&p, l), 1);
}

static void test_same_seed_same_tokens(void **st)
{
	(void)st;
	ds_sampling p;
	ds_sampling_default(&p);
	p.seed = 42;
	int a[64], b[64], differ = 0;
	for (int run = 0; run < 2; run++) {
		ds_sampler *s;
		assert_int_equal(ds_sampler_new(&p, V, &s), 0);
		for (int i = 0; i < 64; i++) {
			float l[V];
			memcpy(l, base, sizeof(l));
			(run ? b : a)[i] = ds_sampler_sample(s, l);
		}
		ds_sampler_free(s);
	}
	assert_memory_equal(a, b, sizeof(a));
	p.seed = 43;
	ds_sampler *s;
	assert_int_equal(ds_sampler_new(&p, V, &s), 0);
	for (int i = 0; i < 64; i++) {
		float l[V];
		memcpy(l, base, sizeof(l));
		differ += ds_sampler_sample(s, l) != a[i];
	}
	ds_sampler_free(s);
	assert_true(differ > 0);
}

/* The filtered distribution equals the one computed here from its definition. */
static void test_filters(void **st)
{
	(void)st;
	ds_sampling p;
	ds_sampling_default(&p);
	p.temperature = 0.7f;
	p.top_k = 4;
	p.top_p = 0.8f;
	ds_sampler *s;
	assert_int_equal(ds_sampler_new(&p, V, &s), 0);
	float probs[V];
	ds_sampler_probs(s, base, probs);
	/* reference: softmax(l/T), keep top 4 = {1,5,2,0}, then smallest prefix
	 * reaching 0.8 of the full mass */
	double e[V], z = 0;
	for (int i = 0; i < V; i++)
		z += (e[i] = exp(base[i] / 0.7));
	int order[4] = { 1, 5, 2, 0 };
	double c = 0;
	int keep = 0;
	while (keep < 4) {
		c += e[order[keep++]] / z;
		if (c >= 0.8)
			break;
	}
	double kept = 0;
	for (int i = 0; i < keep; i++)
		kept += e[order[i]];
	for (int i = 0; i < V; i++) {
		double want = 0;
		for (int j = 0; j < keep; j++)
			if (order[j] == i)
				want = e[i] / kept;
		assert_true(fabs(probs[i] - want) < 1e-6);
	}
	ds_sampler_free(s);
	/* min_p: drop tokens under min_p * p_max */
	ds_sampling_default(&p);
	p.min_p = 0.5f;
	assert_int_equal(ds_sampler_new(&p, V, &s), 0);
	ds_sampler_probs(s, base, probs);
	for (int i = 0; i < V; i++) {
		double pi = e[i] == 0 ? 0 : exp(base[i]) / exp(3.0);
		if (pi < 0.5)
			assert_true(probs[i] == 0);
		else
			assert_true(probs[i] > 0);
	}
	ds_sampler_free(s);
}

static void test_penalties(void **st)
{
	(void)st;
	ds_sampling p;
	ds_sampling_default(&p);
	p.temperature = 0;
	p.frequency_penalty = 1.0f;
	ds_sampler *s;
	assert_int_equal(ds_sampler_new(&p, V, &s), 0);
	float l[V];
	memcpy(l, base, sizeof(l));
	assert_int_equal(ds_sampler_sample(s, l), 1); /* 3.0 */
	memcpy(l, base, sizeof(l));
	assert_int_equal(ds_sampler_sample(s, l), 5); /* 3.0 - 1 < 2.9 */
	ds_sampler_free(s);
	ds_sampling_default(&p);
	p.temperature = 0;
	p.repetition_penalty = 1.5f;
	assert_int_equal(ds_sampler_new(&p, V, &s), 0);
	int32_t prompt[] = { 1 };
	ds_sampler_add_prompt(s, prompt, 1);
	memcpy(l, base, sizeof(l));
	assert_int_equal(ds_sampler_sample(s, l), 5); /* 3.0 / 1.5 = 2.0 */
	ds_sampler_free(s);
}

static void test_validation(void **st)
{
	(void)st;
	ds_sampling p;
	ds_sampling_default(&p);
	const char *why;
	assert_int_equal(ds_sampling_validate(&p, &why), 0);
	p.top_p = 0;
	assert_int_equal(ds_sampling_validate(&p, &why), -22);
	assert_non_null(why);
	ds_sampling_default(&p);
	p.temperature = NAN;
	assert_int_equal(ds_sampling_validate(&p, &why), -22);
	ds_sampler *s;
	assert_int_equal(ds_sampler_new(&p, V, &s), -22);
}

static void test_filters_large_vocab(void **st)
{
	(void)st;
	enum { N = 129280 };
	float *l = malloc(sizeof(float) * N), *got = malloc(sizeof(float) * N), *want = malloc(sizeof(float) * N);
	int32_t *order = malloc(sizeof(int32_t) * N);
	const int ks[] = { 0, 1, 50, 1000 };
	const float ps[] = { 1.0f, 0.5f, 0.9f, 0.999f }, temps[] = { 0.7f, 1.0f, 1.5f };
	unsigned x = 7;
	int cases = 0;
	/* flat logits, peaked logits (a power law), and few distinct values
	 * (ties, broken by id) */
	for (int shape = 0; shape < 3; shape++) {
		for (int i = 0; i < N; i++) {
			x = x * 1103515245u + 12345u;
			const double u = ((x >> 8) & 0xffffff) / 16777216.0;
			l[i] = shape == 0 ? (float)(u * 8 - 4) : shape == 1 ? (float)(-12 * log(1 + 2000 * u)) / 3 : (float)((x >> 9) % 7);
		}
		for (int a = 0; a < 4; a++)
			for (int b = 0; b < 4; b++)
				for (int c = 0; c < 3; c++)
					for (int mp = 0; mp < 2; mp++) {
						ds_sampling p;
						ds_sampling_default(&p);
						p.top_k = ks[a];
						p.top_p = ps[b];
						p.temperature = temps[c];
						p.min_p = mp ? 0.05f : 0;
						ds_sampler *s;
						assert_int_equal(ds_sampler_new(&p, N, &s), 0);
						ds_sampler_probs(s, l, got);
						ds_sampler_free(s);
						ref_probs(&p, l, N, want, order);
						if (memcmp(got, want, sizeof(float) * N))
							fail_msg("shape %d top_k %d top_p %g T %g min_p %g: distributions differ", shape,
								 p.top_k, p.top_p, p.temperature, p.min_p);
						cases++;
					}
	}
	print_message("top-k/top-p selection equals a full sort: %d settings x 129280 tokens, bit for bit\n", cases);
	free(l);
	free(got);
	free(want);
	free(order);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_greedy),      cmocka_unit_test(test_same_seed_same_tokens),
		cmocka_unit_test(test_filters),     cmocka_unit_test(test_penalties),
		cmocka_unit_test(test_validation),  cmocka_unit_test(test_filters_large_vocab),
	};
	return cmocka_run_group_tests_name("sampler", tests, NULL, NULL);
}
