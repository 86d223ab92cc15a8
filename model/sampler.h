/* sampler.h — turns a row of logits into a token: penalties, temperature,
 * top-k, top-p, min-p, then a draw from a per-request seeded RNG (same seed,
 * same logits, same tokens). One sampler per request; not shared. */
#ifndef DS_SAMPLER_H
#define DS_SAMPLER_H

#include <stdint.h>

typedef struct ds_sampling {
	float temperature;        /* 0 = greedy */
	int top_k;                /* 0 = off */
	float top_p;              /* 1 = off */
	float min_p;              /* 0 = off */
	float repetition_penalty; /* 1 = off (CTRL-style, on prompt and output) */
	float presence_penalty;   /* 0 = off (on output tokens) */
	float frequency_penalty;  /* 0 = off (on output tokens) */
	uint64_t seed;
} ds_sampling;

void ds_sampling_default(ds_sampling *s);
/* 1 when any penalty is set (they need the host's token counts). */
int ds_sampling_penalized(const ds_sampling *s);
/* 1 when the token is the logits' argmax, unchanged by any setting
 * (temperature 0, no penalties). */
int ds_sampling_plain_greedy(const ds_sampling *s);
/* The first index of the largest of p[0..n): the tie rule of every greedy
 * choice in dsd (kernels/sample.cu follows it on the GPU). */
int32_t ds_argmax(const float *p, int n);
/* -EINVAL with a message in *why when a value is out of range. */
int ds_sampling_validate(const ds_sampling *s, const char **why);

typedef struct ds_sampler ds_sampler;

int ds_sampler_new(const ds_sampling *p, int vocab, ds_sampler **out);
ds_sampler *ds_sampler_free(ds_sampler *s);
/* The settings the sampler was made with. */
const ds_sampling *ds_sampler_params(const ds_sampler *s);
/* Tokens that count for the repetition penalty (the prompt). */
void ds_sampler_add_prompt(ds_sampler *s, const int32_t *ids, int n);
/* Modifies logits in place (penalties, temperature) and returns a token id;
 * also records it as output for the presence/frequency penalties. */
int32_t ds_sampler_sample(ds_sampler *s, float *logits);
/* Applies penalties and temperature then returns the resulting probability
 * distribution in probs (softmax after top-k/top-p/min-p filtering). Used by
 * speculative sampling. Does not record a token. */
void ds_sampler_probs(ds_sampler *s, const float *logits, float *probs);
/* Records a token chosen outside ds_sampler_sample. */
void ds_sampler_accept(ds_sampler *s, int32_t tok);
/* Uniform [0,1) from the request's RNG. */
double ds_sampler_uniform(ds_sampler *s);
/* Draws from probs (sums to 1). */
int32_t ds_sampler_draw(ds_sampler *s, const float *probs);

#endif
