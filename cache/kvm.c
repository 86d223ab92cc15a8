#include "cache/kvm.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct ds_kvm {
	ds_engine *eng;
	ds_kv_pool *pool;
	ds_prefix *pc;       /* NULL with the cache off */
	ds_sched *sched;
	int bt, max_running;
	ds_step_item *items;
	ds_kvm_req **ready, **failed;
	uint64_t prompt_tokens; /* also counted with the cache off */
};

static int op_available(void *ctx)
{
	ds_kvm *k = ctx;
	return ds_kv_pool_free_count(k->pool) + ds_prefix_cached(k->pc);
}

int ds_prefix_adopt(ds_prefix *pc, ds_seq *s, const int32_t *tokens, int n)
{
	if (!pc)
		return 0;
	if (!s || ds_seq_len(s) != 0 || n < 0)
		return -EINVAL;
	int bt = ds_kv_pool_block_tokens(ds_prefix_pool(pc));
	int max_blocks = n / bt + 1;
	int32_t stackbuf[256];
	int32_t *blk = max_blocks <= 256 ? stackbuf : malloc(sizeof(int32_t) * (size_t)max_blocks);
	if (!blk)
		return -ENOMEM;
	int hit = ds_prefix_lookup(pc, tokens, n, blk, max_blocks);
	if (hit > 0) {
		int rc = ds_seq_adopt_blocks(s, blk, hit / bt, hit);
		if (rc < 0)
			hit = rc;
	}
	if (blk != stackbuf)
		free(blk);
	return hit;
}

int ds_prefix_offer(ds_prefix *pc, const ds_seq *s, const int32_t *tokens, int n)
{
	if (!pc)
		return 0;
	if (n < 0 || n > ds_seq_len(s))
		return -EINVAL;
	int nb;
	const int32_t *blocks = ds_seq_blocks(s, &nb);
	return ds_prefix_insert(pc, tokens, n, blocks, nb);
}

static int op_admit(void *ctx, ds_sched_req *sr)
{
	ds_kvm *k = ctx;
	ds_kvm_req *r = (ds_kvm_req *)sr;
	int rc = ds_seq_new(k->eng, &r->seq);
	if (rc)
		return rc;
	int hit = ds_prefix_adopt(k->pc, r->seq, r->tokens, r->s.n_tokens);
	if (hit < 0) {
		r->seq = ds_seq_free(r->seq);
		return hit;
	}
	r->inserted = hit / k->bt;
	return hit;
}

static void op_release(void *ctx, ds_sched_req *sr)
{
	(void)ctx;
	ds_kvm_req *r = (ds_kvm_req *)sr;
	r->seq = ds_seq_free(r->seq);
	r->inserted = 0;
}

int ds_kvm_new(ds_engine *eng, const ds_kvm_config *c, ds_kvm **out)
{
	if (!eng || !c || !out)
		return -EINVAL;
	ds_kvm *k = calloc(1, sizeof(*k));
	if (!k)
		return -ENOMEM;
	k->eng = eng;
	k->pool = ds_engine_pool(eng);
	k->bt = ds_kv_pool_block_tokens(k->pool);
	k->max_running = c->max_running > 0 ? c->max_running : 64;
	ds_sched_config sc = {
		.block_tokens = k->bt,
		.pool_blocks = ds_kv_pool_blocks(k->pool),
		.max_context = ds_engine_model(eng)->cfg.max_position_embeddings,
		.step_tokens = c->step_tokens > 0 ? c->step_tokens : 512,
		.max_running = k->max_running,
		.uid_max_running = c->uid_max_running,
	};
	ds_sched_ops ops = { .ctx = k, .available = op_available, .admit = op_admit, .release = op_release };
	int rc = 0;
	k->items = calloc((size_t)k->max_running, sizeof(*k->items));
	k->ready = calloc((size_t)k->max_running, sizeof(*k->ready));
	if (!k->items || !k->ready)
		rc = -ENOMEM;
	if (!rc && c->prefix_cache)
		rc = ds_prefix_new(k->pool, &k->pc);
	if (!rc)
		rc = ds_sched_new(&sc, &ops, &k->sched);
	if (rc) {
		ds_kvm_free(k);
		return rc;
	}
	*out = k;
	return 0;
}

ds_kvm *ds_kvm_free(ds_kvm *k)
{
	if (!k)
		return NULL;
	ds_sched_free(k->sched);
	ds_prefix_free(k->pc);
	free(k->items);
	free(k->ready);
	free(k->failed);
	free(k);
	return NULL;
}

int ds_kvm_req_init(ds_kvm_req *r, uint32_t uid, int priority, const int32_t *prompt, int n)
{
	if (!r || n < 1 || !prompt)
		return -EINVAL;
	memset(r, 0, sizeof(*r));
	r->cap = n + 64;
	r->tokens = malloc(sizeof(int32_t) * (size_t)r->cap);
	if (!r->tokens)
		return -ENOMEM;
	memcpy(r->tokens, prompt, sizeof(int32_t) * (size_t)n);
	r->n_prompt = n;
	r->s.n_tokens = n;
	r->s.uid = uid;
	r->s.priority = priority;
	return 0;
}

void ds_kvm_req_clear(ds_kvm_req *r)
{
	if (!r)
		return;
	ds_seq_free(r->seq);
	free(r->tokens);
	memset(r, 0, sizeof(*r));
}

int ds_kvm_add(ds_kvm *k, ds_kvm_req *r)
{
	return ds_sched_add(k->sched, &r->s);
}

void ds_kvm_remove(ds_kvm *k, ds_kvm_req *r)
{
	ds_sched_remove(k->sched, &r->s);
	r->seq = ds_seq_free(r->seq);
}

int ds_kvm_push(ds_kvm_req *r, int32_t tok)
{
	if (r->s.n_tokens == r->cap) {
		int cap = r->cap * 2;
		int32_t *t = realloc(r->tokens, sizeof(int32_t) * (size_t)cap);
		if (!t)
			return -ENOMEM;
		r->tokens = t;
		r->cap = cap;
	}
	r->tokens[r->s.n_tokens++] = tok;
	return 0;
}

int ds_kvm_step(ds_kvm *k, float *logits, ds_kvm_req ***ready, ds_kvm_req ***failed, int *n_failed, ds_err *e)
{
	*n_failed = 0;
	*ready = k->ready;
	/* The plan is exact about blocks, so -ENOSPC should not happen; if the
	 * backend needs more (a copy-on-write), preempt and plan again. */
	for (int attempt = 0;; attempt++) {
		ds_sched_plan p;
		int rc = ds_sched_plan_step(k->sched, &p);
		if (rc < 0)
			return ds_errf(e, rc, "scheduler failed");
		if (p.n_failed) {
			/* plan's failed array is reused by the next plan: keep a copy */
			ds_kvm_req **f = realloc(k->failed, sizeof(*f) * (size_t)(*n_failed + p.n_failed));
			if (!f)
				return ds_errf(e, -ENOMEM, "out of memory");
			k->failed = f;
			for (int i = 0; i < p.n_failed; i++)
				f[(*n_failed)++] = (ds_kvm_req *)p.failed[i];
		}
		*failed = k->failed;
		if (p.n_items == 0)
			return 0;
		for (int i = 0; i < p.n_items; i++) {
			ds_kvm_req *r = (ds_kvm_req *)p.items[i];
			k->items[i] = (ds_step_item){
				.seq = r->seq,
				.tokens = r->tokens + r->s.n_cached,
				.n = r->s.n_sched,
				.logits = r->s.n_cached + r->s.n_sched == r->s.n_tokens ? DS_LOGITS_LAST : DS_LOGITS_NONE,
			};
		}
		rc = ds_engine_step(k->eng, k->items, p.n_items, logits, NULL, e);
		if (rc == -ENOSPC && attempt < 64 && ds_sched_preempt_one(k->sched) == 0)
			continue;
		if (rc)
			return rc;
		int n_ready = 0;
		for (int i = 0; i < p.n_items; i++) {
			ds_kvm_req *r = (ds_kvm_req *)p.items[i];
			if (!r->accounted) {
				/* first scheduled after its first admission: what the cache saved */
				r->accounted = 1;
				r->hit_tokens = r->s.n_cached;
				k->prompt_tokens += (uint64_t)r->n_prompt;
				ds_prefix_account(k->pc, r->n_prompt, r->hit_tokens < r->n_prompt ? r->hit_tokens : r->n_prompt);
			}
			r->s.n_cached += r->s.n_sched;
			if (k->pc && r->s.n_cached / k->bt > r->inserted) {
				ds_prefix_offer(k->pc, r->seq, r->tokens, ds_seq_len(r->seq));
				r->inserted = r->s.n_cached / k->bt;
			}
			if (k->items[i].logits == DS_LOGITS_LAST)
				k->ready[n_ready++] = r;
		}
		return n_ready;
	}
}

int ds_kvm_flush(ds_kvm *k)
{
	return ds_prefix_flush(k->pc);
}

ds_prefix *ds_kvm_prefix(ds_kvm *k)
{
	return k->pc;
}

void ds_kvm_stats_get(const ds_kvm *k, ds_kvm_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (k->pc) {
		ds_prefix_stats_get(k->pc, &st->prefix);
	} else {
		st->prefix.blocks_total = ds_kv_pool_blocks(k->pool);
		st->prefix.blocks_free = ds_kv_pool_free_count(k->pool);
		st->prefix.blocks_used = st->prefix.blocks_total - st->prefix.blocks_free;
		st->prefix.prompt_tokens = k->prompt_tokens;
	}
	ds_sched_stats_get(k->sched, &st->sched);
}
