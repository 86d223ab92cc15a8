/* bench_spec — what speculative decoding with the MTP module buys.
 *
 *   bench_spec [--backend B] [--threads N] [--batches 1,4,16,64] [--tokens N] MODEL
 *     Greedy decoding of English prompts (the model's tokenizer) at each batch
 *     size (below 8, the 8 prompts in rounds), three ways in the same run: MTP off (depth 0), the MTP KV kept
 *     up to date without drafting (what the daemon does above mtp_max_batch),
 *     and drafting at --depth N (default 1). Decode tokens/s (median of 3 runs), acceptance
 *     rate and tokens per step, and the speed-up of drafting over off.
 *   bench_spec --steps [--backend B] [--batches ...] [--context N] MODEL
 *     Step times: the main model with 1-4 tokens a sequence, and chained
 *     verify steps (ds_engine_step_chain, the MTP passes in the same call)
 *     at depths 1-4; median of 10 each.
 *   bench_spec --ratio [--backend B] [--batches ...] [--context N] MODEL
 *     The time of a main-model step verifying 2 tokens per sequence over a
 *     1-token step (median of 10 each, context N, KV rolled back after each),
 *     which with acceptance a bounds the speed-up at (1 + a) / ratio. Any
 *     model; random weights do.
 * The same engine calls as `dsd generate` and the daemon's batcher
 * (model/spec.h). */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/engine.h"
#include "model/spec.h"
#include "model/tokenizer.h"
#include "tests/bench_util.h"

static const char *const prompts[] = {
	"Once upon a time", "The king said to his son", "In the morning the people of the town",
	"She looked at the letter and", "It was a dark and cold night when", "The history of the country",
	"He went to the market to buy", "There is no reason why the",
};
enum { N_PROMPTS = sizeof(prompts) / sizeof(prompts[0]) };

typedef struct {
	double tps, accept, per_step;
	/* sums over the rounds of run_all */
	double sec;
	long tokens, steps;
	uint64_t drafted, accepted;
} result;

/* mode 0: MTP off; 1: MTP KV kept, no drafts; 2: drafting at `depth`.
 * Sequence i decodes prompt (first + i) % N_PROMPTS. */
static int run_spec(ds_engine *eng, ds_tok *tok, int batch, int tokens, int mode, int depth, int first, result *res,
		    ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	ds_seq **seqs = calloc((size_t)batch, sizeof(*seqs));
	ds_sampler **smp = calloc((size_t)batch, sizeof(*smp));
	ds_spec_req *rq = calloc((size_t)batch, sizeof(*rq));
	ds_spec_req **rp = calloc((size_t)batch, sizeof(*rp));
	int32_t **ids = calloc((size_t)batch, sizeof(*ids));
	int *lens = calloc((size_t)batch, sizeof(int));
	int *made = calloc((size_t)batch, sizeof(int));
	int rc = seqs && smp && rq && rp && ids && lens && made ? 0 : -ENOMEM;
	ds_sampling sp;
	ds_sampling_default(&sp);
	sp.temperature = 0;
	for (int i = 0; i < batch && !rc; i++) {
		const char *p = prompts[(first + i) % N_PROMPTS];
		size_t n = 0;
		if ((rc = ds_tok_encode(tok, p, strlen(p), 0, &ids[i], &n, e)))
			break;
		lens[i] = (int)n;
		if ((rc = ds_seq_new(eng, &seqs[i])) || (rc = ds_sampler_new(&sp, m->cfg.vocab_size, &smp[i])))
			break;
		if ((rc = ds_spec_req_init(&rq[i], eng, seqs[i], smp[i], 1, mode ? depth : 0)))
			break;
		rq[i].want = mode == 2;
		rp[i] = &rq[i];
	}
	if (!rc)
		rc = ds_spec_prefill(eng, rp, (const int32_t *const *)ids, lens, batch, e);
	long total = 0, steps = 0;
	double t0 = now();
	for (int s = 0; !rc && s < tokens; s++) {
		/* every sequence runs until it has `tokens`; those done drop out */
		int k = 0;
		for (int i = 0; i < batch; i++)
			if (made[i] < tokens)
				rp[k++] = &rq[i];
		if (!k)
			break;
		if ((rc = ds_spec_step(eng, rp, k, e)))
			break;
		for (int j = 0; j < k; j++) {
			int i = (int)(rp[j] - rq);
			made[i] += rq[i].n_out;
			total += rq[i].n_out;
			steps++;
		}
	}
	double dt = now() - t0;
	uint64_t dr = 0, ac = 0;
	for (int i = 0; i < batch; i++) {
		dr += rq[i].drafted;
		ac += rq[i].accepted;
	}
	res->sec += dt;
	res->tokens += total;
	res->steps += steps;
	res->drafted += dr;
	res->accepted += ac;
	for (int i = 0; rq && i < batch; i++) {
		ds_spec_req_clear(&rq[i]);
		ds_seq_free(seqs ? seqs[i] : NULL);
		ds_sampler_free(smp ? smp[i] : NULL);
		free(ids ? ids[i] : NULL);
	}
	free(seqs);
	free(smp);
	free(rq);
	free(rp);
	free(ids);
	free(lens);
	free(made);
	return rc;
}

/* Batches smaller than the prompt list run it in rounds, so that every
 * batch size decodes every prompt (batch 1 on a single prompt measured that
 * prompt's acceptance, not the model's); figures are over all rounds. */
static int run_all(ds_engine *eng, ds_tok *tok, int batch, int tokens, int mode, int depth, result *res, ds_err *e)
{
	memset(res, 0, sizeof(*res));
	int rc = 0;
	for (int first = 0; first < N_PROMPTS && !rc; first += batch)
		rc = run_spec(eng, tok, batch, tokens, mode, mode == 2 ? depth : 1, first, res, e);
	res->tps = res->sec > 0 ? res->tokens / res->sec : 0;
	res->accept = res->drafted ? (double)res->accepted / (double)res->drafted : 0;
	res->per_step = res->steps ? (double)res->tokens / (double)res->steps : 0;
	return rc;
}

/* Seconds of one main-model step feeding `per` tokens to each of `batch`
 * sequences holding `ctx` positions; the KV is rolled back afterwards (the
 * MTP KV with it). With depth > 0 a chained verify step
 * (ds_engine_step_chain) at that depth, every item chained; ids and mids
 * then take its argmaxes. */
static int time_step(ds_engine *eng, ds_seq **seqs, int batch, int per, int ctx, float *logits, int depth,
		     int32_t *ids, int32_t *mids, double *sec, ds_err *e)
{
	ds_step_item *it = calloc((size_t)batch, sizeof(*it));
	int32_t *toks = malloc(sizeof(int32_t) * (size_t)batch * per);
	const int V = ds_engine_model(eng)->cfg.vocab_size;
	if (!it || !toks) {
		free(it);
		free(toks);
		return -ENOMEM;
	}
	/* different tokens per sequence: experts are hit as in real traffic */
	for (int i = 0; i < batch * per; i++)
		toks[i] = (int32_t)((i * 7919u + 11u) % (unsigned)V);
	for (int i = 0; i < batch; i++)
		it[i] = (ds_step_item){ .seq = seqs[i], .tokens = toks + (size_t)i * per, .n = per,
					.logits = DS_LOGITS_ALL, .argmax_only = depth > 0 };
	double t0 = now();
	int rc = depth ? ds_engine_step_chain(eng, it, batch, batch, depth, logits, ids, mids, NULL, e)
		       : ds_engine_step(eng, it, batch, logits, NULL, e);
	*sec = now() - t0;
	for (int i = 0; !rc && i < batch; i++)
		rc = ds_seq_truncate(seqs[i], ctx);
	free(it);
	free(toks);
	return rc;
}

static int run_ratio(ds_engine *eng, int batch, int ctx, double *t1, double *t2, ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	enum { reps = 10 };
	ds_seq **seqs = calloc((size_t)batch, sizeof(*seqs));
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)ctx);
	float *logits = malloc(sizeof(float) * (size_t)m->cfg.vocab_size * 2 * batch);
	int rc = seqs && ids && logits ? 0 : -ENOMEM;
	unsigned x = 12345;
	/* prefill one at a time so the step's scratch stays small; every
	 * sequence its own random prompt */
	for (int i = 0; i < batch && !rc; i++) {
		for (int j = 0; j < ctx; j++)
			ids[j] = (int32_t)(((x = x * 1103515245u + 12345u) >> 8) % (unsigned)m->cfg.vocab_size);
		if ((rc = ds_seq_new(eng, &seqs[i])))
			break;
		ds_step_item it = { .seq = seqs[i], .tokens = ids, .n = ctx, .logits = DS_LOGITS_NONE };
		rc = ds_engine_step(eng, &it, 1, NULL, NULL, e);
	}
	double a[reps], b[reps], s;
	for (int w = 0; w < 2 && !rc; w++) /* warm-up: both shapes once */
		if (!(rc = time_step(eng, seqs, batch, 1, ctx, logits, 0, NULL, NULL, &s, e)))
			rc = time_step(eng, seqs, batch, 2, ctx, logits, 0, NULL, NULL, &s, e);
	for (int r = 0; r < reps && !rc; r++) {
		if (!(rc = time_step(eng, seqs, batch, 1, ctx, logits, 0, NULL, NULL, &a[r], e)))
			rc = time_step(eng, seqs, batch, 2, ctx, logits, 0, NULL, NULL, &b[r], e);
	}
	if (!rc) {
		*t1 = median(a, reps);
		*t2 = median(b, reps);
	}
	for (int i = 0; seqs && i < batch; i++)
		ds_seq_free(seqs[i]);
	free(seqs);
	free(ids);
	free(logits);
	return rc;
}

/* --steps: main-model steps of 1-4 tokens a sequence and chained verify
 * steps at depths 1-4 (1 + depth tokens, the MTP passes inside), median of
 * 10 each, context ctx: what each depth costs against a plain step. */
static int run_steps(ds_engine *eng, int batch, int ctx, double t[4], double c[4], ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	enum { reps = 10 };
	ds_seq **seqs = calloc((size_t)batch, sizeof(*seqs));
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)(ctx > 8 * batch ? ctx : 8 * batch));
	int32_t *mids = malloc(sizeof(int32_t) * (size_t)batch * 8);
	float *logits = malloc(sizeof(float) * (size_t)V * 5 * batch);
	float *hid = malloc(sizeof(float) * (size_t)H * ctx);
	int rc = seqs && ids && mids && logits && hid ? 0 : -ENOMEM;
	unsigned x = 12345;
	for (int i = 0; i < batch && !rc; i++) {
		for (int j = 0; j < ctx; j++)
			ids[j] = (int32_t)(((x = x * 1103515245u + 12345u) >> 8) % (unsigned)V);
		if ((rc = ds_seq_new(eng, &seqs[i])))
			break;
		ds_step_item it = { .seq = seqs[i], .tokens = ids, .n = ctx, .logits = DS_LOGITS_NONE };
		if ((rc = ds_engine_step(eng, &it, 1, NULL, hid, e)))
			break;
		/* the MTP KV level with the main KV, as chaining needs */
		it.tokens = ids + 1;
		it.n = ctx - 1;
		if ((rc = ds_engine_mtp_step(eng, 0, &it, 1, hid, NULL, NULL, e)))
			break;
		it.tokens = ids;
		it.n = 1;
		rc = ds_engine_mtp_step(eng, 0, &it, 1, hid + (size_t)(ctx - 1) * H, NULL, NULL, e);
	}
	double a[4][reps], b[4][reps], sec;
	for (int r = -2; r < reps && !rc; r++) /* two rounds of warm-up */
		for (int k = 0; k < 4 && !rc; k++) {
			if (!(rc = time_step(eng, seqs, batch, k + 1, ctx, logits, 0, NULL, NULL, &sec, e)) && r >= 0)
				a[k][r] = sec;
			if (!rc && !(rc = time_step(eng, seqs, batch, k + 2, ctx, logits, k + 1, ids, mids, &sec, e)) && r >= 0)
				b[k][r] = sec;
		}
	for (int k = 0; k < 4 && !rc; k++) {
		t[k] = median(a[k], reps);
		c[k] = median(b[k], reps);
	}
	for (int i = 0; seqs && i < batch; i++)
		ds_seq_free(seqs[i]);
	free(seqs);
	free(ids);
	free(mids);
	free(logits);
	free(hid);
	return rc;
}

int main(int argc, char **argv)
{
	const char *backend = "cpu";
	int threads = 0, tokens = 64, ratio = 0, ctx = 512, eager = 0, depth = 1, steps = 0;
	int batches[16] = { 1, 4, 16, 64 }, nb = 4;
	static const struct option lo[] = {
		{ "backend", required_argument, 0, 'b' }, { "threads", required_argument, 0, 't' },
		{ "batches", required_argument, 0, 'B' }, { "tokens", required_argument, 0, 'n' },
		{ "ratio", no_argument, 0, 'r' },         { "context", required_argument, 0, 'c' },
		{ "eager", no_argument, 0, 'e' },         { "depth", required_argument, 0, 'd' },
		{ "steps", no_argument, 0, 's' },
		{ 0 }
	};
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'b': backend = optarg; break;
		case 't': threads = atoi(optarg); break;
		case 'n': tokens = atoi(optarg); break;
		case 'r': ratio = 1; break;
		case 'e': eager = 1; break;
		case 'c': ctx = atoi(optarg); break;
		case 'd': depth = atoi(optarg); break;
		case 's': steps = 1; break;
		case 'B':
			nb = parse_ints(optarg, batches, 16);
			break;
		default: return 2;
		}
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: bench_spec [--ratio|--steps] [--eager] [--backend cpu|cuda] [--threads N] "
				"[--batches LIST] [--tokens N] [--context N] [--depth N] MODEL\n");
		return 2;
	}
	const char *dir = argv[optind];
	ds_err e = { { 0 } };
	ds_model *m;
	ds_engine *eng;
	if (ds_model_open(dir, 0, &m, &e)) {
		fprintf(stderr, "bench_spec: %s\n", e.msg);
		return 1;
	}
	ds_engine_config ec;
	ds_engine_config_default(&ec);
	ec.backend = backend;
	ec.threads = threads;
	ec.eager = eager; /* cuda: no CUDA graphs */
	if (ds_engine_create(m, &ec, &eng, &e)) {
		fprintf(stderr, "bench_spec: %s\n", e.msg);
		ds_model_free(m);
		return 1;
	}
	int rc = 0;
	if (steps) {
		printf("# %s on %s%s, context %d: step ms, main model with 1-4 tokens a sequence, chained verify "
		       "steps at depth 1-4 (median of 10)\n", dir, backend, eager ? " (eager)" : "", ctx);
		printf("%6s %8s %8s %8s %8s %9s %9s %9s %9s\n", "batch", "main 1", "main 2", "main 3", "main 4", "chain d1",
		       "chain d2", "chain d3", "chain d4");
		for (int i = 0; i < nb && !rc; i++) {
			double t[4], ch[4];
			if ((rc = run_steps(eng, batches[i], ctx, t, ch, &e)))
				break;
			printf("%6d %8.3f %8.3f %8.3f %8.3f %9.3f %9.3f %9.3f %9.3f\n", batches[i], t[0] * 1e3, t[1] * 1e3,
			       t[2] * 1e3, t[3] * 1e3, ch[0] * 1e3, ch[1] * 1e3, ch[2] * 1e3, ch[3] * 1e3);
			fflush(stdout);
		}
	} else if (ratio) {
		printf("# %s on %s%s, context %d: main-model step time, 2 tokens per sequence vs 1 (median of 10)\n", dir,
		       backend, eager ? " (eager)" : "", ctx);
		printf("%6s %12s %12s %8s\n", "batch", "1-token ms", "2-token ms", "ratio");
		for (int i = 0; i < nb && !rc; i++) {
			double t1 = 0, t2 = 0;
			if ((rc = run_ratio(eng, batches[i], ctx, &t1, &t2, &e)))
				break;
			printf("%6d %12.3f %12.3f %8.3f\n", batches[i], t1 * 1e3, t2 * 1e3, t2 / t1);
			fflush(stdout);
		}
	} else {
		ds_tok *tok = NULL;
		char path[4096];
		snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
		if (m->n_mtp < 1 || ds_tok_load(path, &tok, &e)) {
			fprintf(stderr, "bench_spec: needs a model with an MTP layer and a tokenizer (%s)\n",
				e.msg[0] ? e.msg : "no MTP layer");
			rc = 1;
		}
		if (!rc) {
			printf("# %s on %s%s: greedy decode of %d tokens per sequence; median of 3 runs\n", dir, backend,
			       eager ? " (eager)" : "", tokens);
			printf("%6s %12s %12s %12s %8s %10s %8s\n", "batch", "off tok/s", "kv-only", "mtp tok/s",
			       "accept", "tok/step", "speedup");
		}
		for (int i = 0; i < nb && !rc; i++) {
			double v[3][3];
			result r2 = { 0 };
			for (int rep = 0; rep < 3 && !rc; rep++)
				for (int mode = 0; mode < 3 && !rc; mode++) {
					result r;
					if ((rc = run_all(eng, tok, batches[i], tokens, mode, depth, &r, &e)))
						break;
					v[mode][rep] = r.tps;
					if (mode == 2)
						r2 = r;
				}
			if (rc)
				break;
			double off = median(v[0], 3), kv = median(v[1], 3), on = median(v[2], 3);
			printf("%6d %12.1f %12.1f %12.1f %8.3f %10.3f %8.2f\n", batches[i], off, kv, on, r2.accept,
			       r2.per_step, on / off);
			fflush(stdout);
		}
		ds_tok_free(tok);
	}
	if (rc)
		fprintf(stderr, "bench_spec: %s\n", e.msg[0] ? e.msg : strerror(-rc));
	ds_engine_free(eng);
	ds_model_free(m);
	return rc ? 1 : 0;
}
