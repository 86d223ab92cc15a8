#include "model/sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct ds_sampler {
	ds_sampling p;
	int vocab;
	uint64_t s[4];       /* xoshiro256** state */
	uint32_t *out_count; /* per token: times generated */
	unsigned char *seen; /* per token: in prompt or output */
	float *probs;
	int32_t *order;
};

void ds_sampling_default(ds_sampling *s)
{
	memset(s, 0, sizeof(*s));
	s->temperature = 1.0f;
	s->top_p = 1.0f;
	s->repetition_penalty = 1.0f;
}

int ds_sampling_penalized(const ds_sampling *s)
{
	return s->repetition_penalty != 1.0f || s->presence_penalty != 0 || s->frequency_penalty != 0;
}

int ds_sampling_plain_greedy(const ds_sampling *s) { return s->temperature == 0 && !ds_sampling_penalized(s); }

const ds_sampling *ds_sampler_params(const ds_sampler *s) { return &s->p; }

int ds_sampling_validate(const ds_sampling *s, const char **why)
{
	const char *w = NULL;
	if (!(s->temperature >= 0 && s->temperature <= 100))
		w = "temperature must be in [0, 100]";
	else if (s->top_k < 0)
		w = "top_k must be >= 0";
	else if (!(s->top_p > 0 && s->top_p <= 1))
		w = "top_p must be in (0, 1]";
	else if (!(s->min_p >= 0 && s->min_p <= 1))
		w = "min_p must be in [0, 1]";
	else if (!(s->repetition_penalty > 0 && s->repetition_penalty <= 10))
		w = "repetition_penalty must be in (0, 10]";
	else if (!(s->presence_penalty >= -2 && s->presence_penalty <= 2))
		w = "presence_penalty must be in [-2, 2]";
	else if (!(s->frequency_penalty >= -2 && s->frequency_penalty <= 2))
		w = "frequency_penalty must be in [-2, 2]";
	if (why)
		*why = w;
	return w ? -EINVAL : 0;
}

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next(ds_sampler *s)
{
	uint64_t *q = s->s;
	uint64_t r = rotl(q[1] * 5, 7) * 9, t = q[1] << 17;
	q[2] ^= q[0];
	q[3] ^= q[1];
	q[1] ^= q[2];
	q[0] ^= q[3];
	q[2] ^= t;
	q[3] = rotl(q[3], 45);
	return r;
}

double ds_sampler_uniform(ds_sampler *s) { return (double)(next(s) >> 11) * 0x1.0p-53; }

int ds_sampler_new(const ds_sampling *p, int vocab, ds_sampler **out)
{
	if (vocab <= 0 || ds_sampling_validate(p, NULL))
		return -EINVAL;
	ds_sampler *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->p = *p;
	s->vocab = vocab;
	uint64_t x = p->seed;
	for (int i = 0; i < 4; i++)
		s->s[i] = splitmix(&x);
	s->out_count = calloc((size_t)vocab, sizeof(uint32_t));
	s->seen = calloc((size_t)vocab, 1);
	s->probs = malloc(sizeof(float) * (size_t)vocab);
	s->order = malloc(sizeof(int32_t) * (size_t)vocab);
	if (!s->out_count || !s->seen || !s->probs || !s->order) {
		ds_sampler_free(s);
		return -ENOMEM;
	}
	*out = s;
	return 0;
}

ds_sampler *ds_sampler_free(ds_sampler *s)
{
	if (s) {
		free(s->out_count);
		free(s->seen);
		free(s->probs);
		free(s->order);
		free(s);
	}
	return NULL;
}

void ds_sampler_add_prompt(ds_sampler *s, const int32_t *ids, int n)
{
	for (int i = 0; i < n; i++)
		if (ids[i] >= 0 && ids[i] < s->vocab)
			s->seen[ids[i]] = 1;
}

void ds_sampler_accept(ds_sampler *s, int32_t tok)
{
	if (tok >= 0 && tok < s->vocab) {
		s->out_count[tok]++;
		s->seen[tok] = 1;
	}
}

static void penalize(ds_sampler *s, float *l)
{
	const ds_sampling *p = &s->p;
	if (!ds_sampling_penalized(p))
		return;
	for (int i = 0; i < s->vocab; i++) {
		if (s->seen[i] && p->repetition_penalty != 1)
			l[i] = l[i] > 0 ? l[i] / p->repetition_penalty : l[i] * p->repetition_penalty;
		if (s->out_count[i])
			l[i] -= p->presence_penalty + p->frequency_penalty * (float)s->out_count[i];
	}
}

int32_t ds_argmax(const float *l, int n)
{
	int32_t b = 0;
	for (int i = 1; i < n; i++)
		if (l[i] > l[b])
			b = i;
	return b;
}

static int cmp_desc(const void *a, const void *b, void *base)
{
	const float *pr = base;
	float x = pr[*(const int32_t *)a], y = pr[*(const int32_t *)b];
	if (x != y)
		return x > y ? -1 : 1;
	return *(const int32_t *)a - *(const int32_t *)b;
}

/* cmp_desc's total order: more probable first, then the lower id. */
static inline int before(const float *pr, int32_t a, int32_t b)
{
	return pr[a] > pr[b] || (pr[a] == pr[b] && a < b);
}

/* Hoare partition of a[lo..hi] around a median-of-three pivot in
 * cmp_desc's order: on return a[lo..*j] come before the pivot, a[*i..hi]
 * after it, anything between is the pivot. */
static void partition(int32_t *a, int lo, int hi, const float *pr, int *pi, int *pj)
{
	const int mid = lo + (hi - lo) / 2;
	int32_t x = a[lo], y = a[mid], z = a[hi], pv;
	if (before(pr, x, y))
		pv = before(pr, y, z) ? y : before(pr, x, z) ? z : x;
	else
		pv = before(pr, x, z) ? x : before(pr, y, z) ? z : y;
	int i = lo, j = hi;
	while (i <= j) {
		while (before(pr, a[i], pv))
			i++;
		while (before(pr, pv, a[j]))
			j--;
		if (i <= j) {
			int32_t tmp = a[i];
			a[i++] = a[j];
			a[j--] = tmp;
		}
	}
	*pi = i;
	*pj = j;
}

/* The smallest n such that the n first tokens of a[0..len) in cmp_desc's
 * order hold at least `target` of the mass (len when none does), those n
 * left first in a: a quickselect steered by partial sums. */
static int nucleus(int32_t *a, int len, double target, const float *pr)
{
	int lo = 0, hi = len - 1;
	double acc = 0; /* mass of a[0..lo) */
	while (lo <= hi) {
		if (hi - lo < 32) {
			qsort_r(a + lo, (size_t)(hi - lo + 1), sizeof(int32_t), cmp_desc, (void *)pr);
			for (int k = lo; k <= hi; k++)
				if ((acc += pr[a[k]]) >= target)
					return k + 1;
			return len;
		}
		int i, j;
		partition(a, lo, hi, pr, &i, &j);
		double left = 0;
		for (int k = lo; k <= j; k++)
			left += pr[a[k]];
		if (acc + left >= target) {
			hi = j;
			continue;
		}
		acc += left;
		for (int k = j + 1; k < i; k++)
			if ((acc += pr[a[k]]) >= target)
				return k + 1;
		lo = i;
	}
	return len;
}

/* Partitions a[0..n) so that a[0..k) holds the k first tokens of cmp_desc's
 * order (in any order): quickselect, O(n) expected. */
static void select_top(int32_t *a, int n, int k, const float *pr)
{
	int lo = 0, hi = n - 1;
	const int t = k - 1;
	while (lo < hi) {
		int i, j;
		partition(a, lo, hi, pr, &i, &j);
		if (t <= j)
			hi = j;
		else if (t >= i)
			lo = i;
		else
			break;
	}
}

/* How many of the most probable tokens top-k and top-p keep, left first in
 * s->order (the rest after them). Selection, not a sort of the vocabulary:
 * O(V) expected where a sort of V3's 129K ids took ~20 ms a token. */
static int top_set(ds_sampler *s, const float *probs, int V)
{
	const ds_sampling *p = &s->p;
	const int limit = p->top_k > 0 && p->top_k < V ? p->top_k : V;
	for (int i = 0; i < V; i++)
		s->order[i] = i;
	if (limit < V)
		select_top(s->order, V, limit, probs);
	return p->top_p < 1 ? nucleus(s->order, limit, p->top_p, probs) : limit;
}

/* probs[] <- filtered, renormalized distribution over logits l (already
 * penalized). Greedy puts all mass on the argmax. */
static void distribution(ds_sampler *s, const float *l, float *probs)
{
	const ds_sampling *p = &s->p;
	const int V = s->vocab;
	if (p->temperature == 0) {
		memset(probs, 0, sizeof(float) * (size_t)V);
		probs[ds_argmax(l, V)] = 1;
		return;
	}
	float m = l[ds_argmax(l, V)];
	double sum = 0;
	for (int i = 0; i < V; i++) {
		probs[i] = expf((l[i] - m) / p->temperature);
		sum += probs[i];
	}
	for (int i = 0; i < V; i++)
		probs[i] = (float)(probs[i] / sum);
	if ((p->top_k > 0 && p->top_k < V) || p->top_p < 1) {
		const int keep = top_set(s, probs, V);
		for (int i = keep; i < V; i++)
			probs[s->order[i]] = 0;
	}
	if (p->min_p > 0) {
		float pmax = probs[ds_argmax(probs, V)];
		for (int i = 0; i < V; i++)
			if (probs[i] < p->min_p * pmax)
				probs[i] = 0;
	}
	sum = 0;
	for (int i = 0; i < V; i++)
		sum += probs[i];
	for (int i = 0; i < V; i++)
		probs[i] = (float)(probs[i] / sum);
}

void ds_sampler_probs(ds_sampler *s, const float *logits, float *probs)
{
	memcpy(s->probs, logits, sizeof(float) * (size_t)s->vocab);
	penalize(s, s->probs);
	distribution(s, s->probs, probs);
}

int32_t ds_sampler_draw(ds_sampler *s, const float *probs)
{
	double u = ds_sampler_uniform(s), c = 0;
	int last = 0;
	for (int i = 0; i < s->vocab; i++) {
		if (probs[i] <= 0)
			continue;
		last = i;
		c += probs[i];
		if (u < c)
			return i;
	}
	return last;
}

int32_t ds_sampler_sample(ds_sampler *s, float *logits)
{
	penalize(s, logits);
	int32_t tok;
	if (s->p.temperature == 0) {
		tok = ds_argmax(logits, s->vocab);
	} else {
		distribution(s, logits, s->probs);
		tok = ds_sampler_draw(s, s->probs);
	}
	ds_sampler_accept(s, tok);
	return tok;
}
