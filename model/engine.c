#include "model/engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct ds_engine {
	const ds_model *m;
	const ds_backend_ops *ops;
	ds_backend *be;
	ds_kv_pool *pool;
	int block_tokens;
	ds_wload_result load;
	/* step scratch */
	int *n_new, *pos0, *logits_from;
	const int32_t **tables;
	int32_t *tokens;
	uint8_t *need;  /* per logit row (at most one per token) */
	ds_draw *draw;
	int cap_seqs, cap_tokens;
	int force_chain; /* ds_engine_force_chain */
};

struct ds_seq {
	ds_engine *eng;
	int32_t *blocks;
	int n_blocks, cap_blocks;
	int n_tokens; /* main-model positions cached */
	int n_mtp;    /* MTP positions cached */
};

void ds_engine_config_default(ds_engine_config *c)
{
	memset(c, 0, sizeof(*c));
	c->backend = "cpu";
	c->block_tokens = 64;
	c->gpu_kv_fraction = 0.9;
	c->uring_load = 1;
}

int ds_engine_create(const ds_model *m, const ds_engine_config *cfg, ds_engine **out, ds_err *e)
{
	ds_engine_config dflt;
	if (!cfg) {
		ds_engine_config_default(&dflt);
		cfg = &dflt;
	}
	const ds_backend_ops *ops = ds_backend_find(cfg->backend);
	if (!ops)
		return ds_errf(e, -ENOTSUP, "backend '%s' is not built in (cpu%s)", cfg->backend ? cfg->backend : "",
			       ds_backend_find("cuda") ? ", cuda" : "");
	ds_engine *eng = calloc(1, sizeof(*eng));
	if (!eng)
		return -ENOMEM;
	eng->m = m;
	eng->ops = ops;
	eng->block_tokens = cfg->block_tokens > 0 ? cfg->block_tokens : 64;
	ds_backend_config bc = {
		.threads = cfg->threads,
		.block_tokens = eng->block_tokens,
		.kv_blocks = cfg->kv_blocks,
		.device = cfg->device,
		.gpu_kv_fraction = cfg->gpu_kv_fraction,
		.kv_bytes = cfg->kv_bytes,
		.uring_load = cfg->uring_load,
		.eager = cfg->eager,
		.load_progress = cfg->load_progress,
	};
	if (bc.kv_blocks <= 0 && !strcmp(ops->name, "cpu")) {
		size_t per = ds_kv_block_bytes(m, eng->block_tokens);
		size_t bytes = cfg->kv_bytes;
		if (!bytes) {
			/* Eight full contexts, capped at 1 GiB. */
			bytes = per * (size_t)(8 * ((m->cfg.max_position_embeddings + eng->block_tokens - 1) /
						  eng->block_tokens));
			if (bytes > ((size_t)1 << 30))
				bytes = (size_t)1 << 30;
		}
		bc.kv_blocks = (int)(bytes / per);
		if (bc.kv_blocks < 1) {
			free(eng);
			return ds_errf(e, -EINVAL, "KV pool of %zu bytes holds no %zu-byte block", bytes, per);
		}
	}
	int rc = ops->create(m, &bc, &eng->be, e);
	if (rc) {
		free(eng);
		return rc;
	}
	eng->load = bc.load_result;
	/* A backend that sized the pool itself reports the count back in bc. */
	rc = ds_kv_pool_new(bc.kv_blocks, eng->block_tokens, &eng->pool);
	if (rc) {
		ops->destroy(eng->be);
		free(eng);
		return ds_errf(e, rc, "cannot create a KV pool of %d blocks", bc.kv_blocks);
	}
	*out = eng;
	return 0;
}

ds_engine *ds_engine_free(ds_engine *eng)
{
	if (!eng)
		return NULL;
	if (eng->be)
		eng->ops->destroy(eng->be);
	ds_kv_pool_free(eng->pool);
	free(eng->n_new);
	free(eng->pos0);
	free(eng->logits_from);
	free(eng->tables);
	free(eng->tokens);
	free(eng->need);
	free(eng->draw);
	free(eng);
	return NULL;
}

const ds_model *ds_engine_model(const ds_engine *eng) { return eng->m; }
const ds_wload_result *ds_engine_load_result(const ds_engine *eng) { return &eng->load; }

int ds_engine_expert_load(ds_engine *eng, uint64_t *out)
{
	return eng->ops->expert_load ? eng->ops->expert_load(eng->be, out) : -ENOTSUP;
}

ds_kv_pool *ds_engine_pool(ds_engine *eng) { return eng->pool; }
const char *ds_engine_backend_name(const ds_engine *eng) { return eng->ops->name; }

int ds_seq_new(ds_engine *eng, ds_seq **out)
{
	ds_seq *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->eng = eng;
	*out = s;
	return 0;
}

ds_seq *ds_seq_free(ds_seq *s)
{
	if (!s)
		return NULL;
	for (int i = 0; i < s->n_blocks; i++)
		ds_kv_pool_unref(s->eng->pool, s->blocks[i]);
	free(s->blocks);
	free(s);
	return NULL;
}

int ds_seq_len(const ds_seq *s) { return s->n_tokens; }
int ds_seq_mtp_len(const ds_seq *s) { return s->n_mtp; }

const int32_t *ds_seq_blocks(const ds_seq *s, int *count)
{
	if (count)
		*count = s->n_blocks;
	return s->blocks;
}

static int reserve_blocks(ds_seq *s, int n)
{
	if (n <= s->cap_blocks)
		return 0;
	int cap = s->cap_blocks ? s->cap_blocks * 2 : 8;
	while (cap < n)
		cap *= 2;
	int32_t *nb = realloc(s->blocks, sizeof(int32_t) * (size_t)cap);
	if (!nb)
		return -ENOMEM;
	s->blocks = nb;
	s->cap_blocks = cap;
	return 0;
}

static void drop_blocks_after(ds_seq *s, int keep)
{
	while (s->n_blocks > keep)
		ds_kv_pool_unref(s->eng->pool, s->blocks[--s->n_blocks]);
}

int ds_seq_truncate(ds_seq *s, int n)
{
	if (n < 0 || n > s->n_tokens)
		return -EINVAL;
	s->n_tokens = n;
	if (s->n_mtp > n)
		s->n_mtp = n;
	const int bt = s->eng->block_tokens;
	drop_blocks_after(s, (n + bt - 1) / bt);
	return 0;
}

int ds_seq_mtp_truncate(ds_seq *s, int n)
{
	if (n < 0 || n > s->n_mtp)
		return -EINVAL;
	s->n_mtp = n;
	return 0;
}

int ds_seq_adopt_blocks(ds_seq *s, const int32_t *blocks, int n_blocks, int n_tokens)
{
	const int bt = s->eng->block_tokens;
	if (s->n_tokens || s->n_blocks || n_tokens < 0 || n_blocks != (n_tokens + bt - 1) / bt)
		return -EINVAL;
	int rc = reserve_blocks(s, n_blocks);
	if (rc)
		return rc;
	for (int i = 0; i < n_blocks; i++) {
		ds_kv_pool_ref(s->eng->pool, blocks[i]);
		s->blocks[i] = blocks[i];
	}
	s->n_blocks = n_blocks;
	s->n_tokens = n_tokens;
	/* The MTP layer's KV in adopted blocks is the donor's: right when the
	 * donor ran the MTP module over the same tokens, stale otherwise. Drafts
	 * are verified, so stale MTP context costs acceptance, never output. */
	s->n_mtp = n_tokens;
	return 0;
}

/* Makes blocks for positions [from, to) present and private to s: new
 * blocks are allocated, shared ones about to be written are copied.
 * *added counts new blocks so a failed step can give them back. */
static int prepare_blocks(ds_seq *s, int from, int to, int *added)
{
	ds_engine *eng = s->eng;
	const int bt = eng->block_tokens;
	int need = (to + bt - 1) / bt;
	int rc = reserve_blocks(s, need);
	if (rc)
		return rc;
	for (int i = from / bt; i < s->n_blocks && i < need; i++) {
		if (ds_kv_pool_refcount(eng->pool, s->blocks[i]) <= 1)
			continue;
		if (!eng->ops->kv_copy)
			return -ENOTSUP;
		int32_t nb = ds_kv_pool_alloc(eng->pool);
		if (nb < 0)
			return nb;
		rc = eng->ops->kv_copy(eng->be, nb, s->blocks[i]);
		if (rc) {
			ds_kv_pool_unref(eng->pool, nb);
			return rc;
		}
		ds_kv_pool_unref(eng->pool, s->blocks[i]);
		s->blocks[i] = nb;
	}
	while (s->n_blocks < need) {
		int32_t nb = ds_kv_pool_alloc(eng->pool);
		if (nb < 0)
			return nb;
		s->blocks[s->n_blocks++] = nb;
		(*added)++;
	}
	return 0;
}

int ds_engine_logit_rows(const ds_step_item *items, int n)
{
	int rows = 0;
	for (int i = 0; i < n; i++)
		rows += items[i].logits == DS_LOGITS_ALL ? items[i].n : items[i].logits == DS_LOGITS_LAST ? 1 : 0;
	return rows;
}

static int grow_scratch(ds_engine *eng, int n_seqs, int n_tokens)
{
	if (n_seqs > eng->cap_seqs) {
		int c = n_seqs * 2;
		int *a = realloc(eng->n_new, sizeof(int) * (size_t)c);
		if (a)
			eng->n_new = a;
		int *b = realloc(eng->pos0, sizeof(int) * (size_t)c);
		if (b)
			eng->pos0 = b;
		int *d = realloc(eng->logits_from, sizeof(int) * (size_t)c);
		if (d)
			eng->logits_from = d;
		const int32_t **t = realloc(eng->tables, sizeof(*t) * (size_t)c);
		if (t)
			eng->tables = t;
		if (!a || !b || !d || !t)
			return -ENOMEM;
		eng->cap_seqs = c;
	}
	if (n_tokens > eng->cap_tokens) {
		int c = n_tokens * 2;
		int32_t *t = realloc(eng->tokens, sizeof(int32_t) * (size_t)c);
		if (t)
			eng->tokens = t;
		uint8_t *nd = realloc(eng->need, (size_t)c);
		if (nd)
			eng->need = nd;
		ds_draw *dr = realloc(eng->draw, sizeof(ds_draw) * (size_t)c);
		if (dr)
			eng->draw = dr;
		if (!t || !nd || !dr)
			return -ENOMEM;
		eng->cap_tokens = c;
	}
	return 0;
}

/* A chained item's accepted count: its leading rows whose argmax is the
 * item's next token (its drafts, checked greedily). Deeper chained passes
 * continue from the row after them (kernels/chain.h computes the same on
 * the device). */
static int chain_accepted(const ds_step_item *it, const int32_t *ids)
{
	int j = 0;
	while (j + 1 < it->n && ids[j] == it->tokens[j + 1])
		j++;
	return j;
}

/* n_chain > 0 (main steps on a backend with `chain`): the first n_chain
 * items' MTP KV grows with their main KV (ds_engine_step_chain). */
static int run_step(ds_engine *eng, int mtp, const ds_step_item *items, int n_items, const float *hidden_in,
		    float *logits, int32_t *ids, float *hidden, int n_chain, int depth, int32_t *mtp_ids, ds_err *e)
{
	const ds_model *m = eng->m;
	int total = 0;
	if (n_items <= 0)
		return ds_errf(e, -EINVAL, "empty step");
	for (int i = 0; i < n_items; i++) {
		const ds_seq *s = items[i].seq;
		if (!s || s->eng != eng || items[i].n < 1 || !items[i].tokens)
			return ds_errf(e, -EINVAL, "step item %d: needs a sequence of this engine and n >= 1", i);
		int base = mtp ? s->n_mtp : s->n_tokens;
		/* The MTP module may run ahead of the main model by chained drafts;
		 * those positions are rolled back before the main model gets there. */
		if (mtp && base > s->n_tokens + DS_MTP_MAX_AHEAD)
			return ds_errf(e, -EINVAL, "step item %d: MTP position %d is beyond the cached %d", i, base,
				       s->n_tokens);
		if (base + items[i].n > m->cfg.max_position_embeddings)
			return ds_errf(e, -E2BIG, "step item %d: %d positions exceed the model's context (%d)", i,
				       base + items[i].n, m->cfg.max_position_embeddings);
		for (int j = 0; j < i; j++)
			if (items[j].seq == s)
				return ds_errf(e, -EINVAL, "step items %d and %d name the same sequence", j, i);
		total += items[i].n;
	}
	int rc = grow_scratch(eng, n_items, total);
	if (rc)
		return ds_errf(e, rc, "out of memory");
	/* Blocks first, for every item, so a shortage changes nothing. */
	int *added = calloc((size_t)n_items, sizeof(int));
	if (!added)
		return -ENOMEM;
	for (int i = 0; i < n_items; i++) {
		ds_seq *s = items[i].seq;
		int base = mtp ? s->n_mtp : s->n_tokens;
		/* deeper chained passes write MTP KV up to depth - 1 positions on
		 * (ds_engine_step_chain checked they fit the context) */
		rc = prepare_blocks(s, base, base + items[i].n + (i < n_chain ? depth - 1 : 0), &added[i]);
		if (rc) {
			for (int j = 0; j <= i; j++)
				drop_blocks_after(items[j].seq, items[j].seq->n_blocks - added[j]);
			free(added);
			return rc == -ENOSPC ? ds_errf(e, rc, "KV pool full") : ds_errf(e, rc, "KV block setup failed");
		}
	}
	int off = 0;
	for (int i = 0; i < n_items; i++) {
		const ds_seq *s = items[i].seq;
		eng->n_new[i] = items[i].n;
		eng->pos0[i] = mtp ? s->n_mtp : s->n_tokens;
		eng->tables[i] = s->blocks;
		eng->logits_from[i] = items[i].logits == DS_LOGITS_ALL ? 0
				      : items[i].logits == DS_LOGITS_LAST ? items[i].n - 1
									 : items[i].n;
		memcpy(eng->tokens + off, items[i].tokens, sizeof(int32_t) * (size_t)items[i].n);
		off += items[i].n;
	}
	ds_batch b = {
		.n_seqs = n_items,
		.n_new = eng->n_new,
		.pos0 = eng->pos0,
		.tokens = eng->tokens,
		.block_tables = eng->tables,
		.logits_from = eng->logits_from,
		.mtp = mtp,
		.hidden_in = hidden_in,
		.n_chain = n_chain,
		.chain_depth = depth,
	};
	ds_step_out o = { .logits = logits, .hidden = hidden, .argmax = ids, .mtp_argmax = mtp_ids };
	if (ids) {
		/* Logit rows (at most one per token) in the engine's scratch. */
		int skip = 0, draws = 0;
		for (int i = 0, r = 0; i < n_items; i++)
			for (int j = eng->logits_from[i]; j < items[i].n; j++, r++) {
				eng->need[r] = !items[i].argmax_only && !items[i].draw;
				eng->draw[r] = items[i].draw ? *items[i].draw : (ds_draw){ .temperature = 0 };
				skip |= !eng->need[r];
				draws |= items[i].draw != NULL;
			}
		o.need = skip ? eng->need : NULL;
		o.draw = draws ? eng->draw : NULL;
	}
	rc = eng->ops->forward(eng->be, &b, &o, e);
	if (rc) {
		for (int j = 0; j < n_items; j++)
			drop_blocks_after(items[j].seq, items[j].seq->n_blocks - added[j]);
		free(added);
		return rc;
	}
	free(added);
	for (int i = 0, row = 0; i < n_items; row += items[i].n, i++) {
		if (mtp)
			items[i].seq->n_mtp += items[i].n;
		else
			items[i].seq->n_tokens += items[i].n;
		if (i < n_chain)
			items[i].seq->n_mtp += depth > 1 ? chain_accepted(&items[i], ids + row) + 1 : items[i].n;
	}
	return 0;
}

int ds_engine_step(ds_engine *eng, const ds_step_item *items, int n_items, float *logits, float *hidden,
		   ds_err *e)
{
	return run_step(eng, 0, items, n_items, NULL, logits, NULL, hidden, 0, 1, NULL, e);
}

int ds_engine_draws(const ds_engine *eng) { return eng->ops->draws; }

int ds_engine_chains(const ds_engine *eng) { return eng->force_chain > 0 || (eng->ops->chain && !eng->force_chain); }
void ds_engine_force_chain(ds_engine *eng, int on) { eng->force_chain = on > 0 ? 1 : on < 0 ? -1 : 0; }

int ds_engine_step_ids(ds_engine *eng, const ds_step_item *items, int n_items, float *logits, int32_t *ids,
		       float *hidden, ds_err *e)
{
	return ds_engine_step_chain(eng, items, n_items, 0, 1, logits, ids, NULL, hidden, e);
}

/* ds_engine_step_chain where the backend cannot chain (or must not): the
 * steps one by one, the hidden states through the host (chained rows come
 * first in ids and hidden). */
static int chain_on_host(ds_engine *eng, const ds_step_item *items, int n_items, int n_chain, int depth,
			 float *logits, int32_t *ids, int32_t *mtp_ids, float *hidden, ds_err *e)
{
	const int H = eng->m->cfg.hidden_size;
	int total = 0, tc = 0;
	for (int i = 0; i < n_items; i++)
		total += items[i].n > 0 ? items[i].n : 0;
	for (int i = 0; i < n_chain; i++)
		tc += items[i].n;
	float *h = hidden ? hidden : malloc(sizeof(float) * (size_t)H * (size_t)(total > 0 ? total : 1));
	/* depth > 1: the MTP outputs, the next pass's inputs, and each item's
	 * accepted row and MTP length */
	float *ho = depth > 1 ? malloc(sizeof(float) * (size_t)H * (size_t)tc) : NULL;
	float *hi = depth > 1 ? malloc(sizeof(float) * (size_t)H * (size_t)n_chain) : NULL;
	ds_step_item *mi = malloc(sizeof(*mi) * (size_t)n_chain);
	int *row = malloc(sizeof(int) * (size_t)n_chain * 2), *level = row ? row + n_chain : NULL;
	int rc = h && mi && row && (depth == 1 || (ho && hi)) ? 0 : -ENOMEM;
	if (!rc)
		rc = run_step(eng, 0, items, n_items, NULL, logits, ids, h, 0, 1, NULL, e);
	if (rc)
		goto out;
	for (int i = 0, off = 0; i < n_chain; off += items[i].n, i++)
		mi[i] = (ds_step_item){ .seq = items[i].seq, .tokens = ids + off, .n = items[i].n, .logits = DS_LOGITS_ALL,
					.argmax_only = 1 };
	/* The chained items' logit rows are the caller's don't-care rows. */
	rc = run_step(eng, 1, mi, n_chain, h, logits, mtp_ids, ho, 0, 1, NULL, e);
	/* Deeper passes: one position a sequence, after its accepted row, fed
	 * the previous pass's token and output there; the MTP KV ends level
	 * with the accepted prefix, as on the device. */
	for (int i = 0, off = 0; !rc && depth > 1 && i < n_chain; off += items[i].n, i++) {
		const int j = chain_accepted(&items[i], ids + off);
		row[i] = off + j;
		level[i] = items[i].seq->n_tokens - items[i].n + j + 1;
		ds_seq_mtp_truncate(items[i].seq, level[i]);
		memcpy(hi + (size_t)i * H, ho + (size_t)row[i] * H, sizeof(float) * (size_t)H);
	}
	int32_t *deep = mtp_ids + tc;
	for (int k = 2; !rc && k <= depth; k++, deep += n_chain) {
		const int32_t *prev = k == 2 ? mtp_ids : deep - n_chain;
		for (int i = 0; i < n_chain; i++)
			mi[i] = (ds_step_item){ .seq = items[i].seq, .tokens = prev + (k == 2 ? row[i] : i), .n = 1,
						.logits = DS_LOGITS_ALL, .argmax_only = 1 };
		rc = run_step(eng, 1, mi, n_chain, hi, logits, deep, ho, 0, 1, NULL, e);
		memcpy(hi, ho, sizeof(float) * (size_t)H * n_chain);
	}
	for (int i = 0; !rc && depth > 1 && i < n_chain; i++)
		ds_seq_mtp_truncate(items[i].seq, level[i]);
	if (rc) /* as if the step had not run */
		for (int i = 0; i < n_items; i++)
			ds_seq_truncate(items[i].seq, items[i].seq->n_tokens - items[i].n);
out:
	if (h != hidden)
		free(h);
	free(ho);
	free(hi);
	free(mi);
	free(row);
	return rc;
}

int ds_engine_step_chain(ds_engine *eng, const ds_step_item *items, int n_items, int n_chain, int depth,
			 float *logits, int32_t *ids, int32_t *mtp_ids, float *hidden, ds_err *e)
{
	if (!ids || !logits || (n_chain && !mtp_ids))
		return ds_errf(e, -EINVAL, "a step with ids needs logits and ids (and MTP ids to chain)");
	if (n_chain < 0 || n_chain > n_items || (n_chain && eng->m->n_mtp < 1))
		return ds_errf(e, -EINVAL, "cannot chain %d of %d items (the model has %d MTP layers)", n_chain, n_items,
			       eng->m->n_mtp);
	if (depth < 1 || depth > DS_MTP_MAX_AHEAD + 1)
		return ds_errf(e, -EINVAL, "chained drafting depth %d outside 1..%d", depth, DS_MTP_MAX_AHEAD + 1);
	for (int i = 0; i < n_items; i++) {
		const ds_step_item *it = &items[i];
		if (it->draw && (!eng->ops->draws || it->logits != DS_LOGITS_LAST))
			return ds_errf(e, -EINVAL, "step item %d: a device draw needs a backend that draws and DS_LOGITS_LAST",
				       i);
		if (i >= n_chain)
			continue;
		if (it->logits != DS_LOGITS_ALL || !it->argmax_only || it->draw || !it->seq ||
		    it->seq->n_mtp != it->seq->n_tokens)
			return ds_errf(e, -EINVAL,
				       "step item %d: a chained item takes the argmax of all its rows and has its MTP KV "
				       "level with its main KV", i);
		/* the deeper passes' positions, whatever is accepted (on every backend) */
		if (it->n > 0 && it->seq->n_tokens + it->n + depth - 1 > eng->m->cfg.max_position_embeddings)
			return ds_errf(e, -E2BIG, "step item %d: chained drafts at depth %d exceed the model's context (%d)",
				       i, depth, eng->m->cfg.max_position_embeddings);
	}
	if (!n_chain || (eng->ops->chain && eng->force_chain >= 0))
		return run_step(eng, 0, items, n_items, NULL, logits, ids, hidden, n_chain, depth, mtp_ids, e);
	return chain_on_host(eng, items, n_items, n_chain, depth, logits, ids, mtp_ids, hidden, e);
}

int ds_engine_mtp_step(ds_engine *eng, int depth, const ds_step_item *items, int n_items, const float *hidden_in,
		       float *logits, float *hidden_out, ds_err *e)
{
	if (depth < 0 || depth >= eng->m->n_mtp)
		return ds_errf(e, -EINVAL, "the model has %d MTP layers; depth %d asked", eng->m->n_mtp, depth);
	if (!hidden_in)
		return ds_errf(e, -EINVAL, "an MTP step needs the main model's hidden states");
	return run_step(eng, depth + 1, items, n_items, hidden_in, logits, NULL, hidden_out, 0, 1, NULL, e);
}

int ds_engine_mtp_step_ids(ds_engine *eng, int depth, const ds_step_item *items, int n_items, const float *hidden_in,
			   float *logits, int32_t *ids, float *hidden_out, ds_err *e)
{
	if (depth < 0 || depth >= eng->m->n_mtp)
		return ds_errf(e, -EINVAL, "the model has %d MTP layers; depth %d asked", eng->m->n_mtp, depth);
	if (!hidden_in || !ids || !logits)
		return ds_errf(e, -EINVAL, "an MTP step with ids needs hidden states, logits and ids");
	for (int i = 0; i < n_items; i++)
		if (items[i].draw)
			return ds_errf(e, -EINVAL, "step item %d: MTP steps do not draw on the device", i);
	return run_step(eng, depth + 1, items, n_items, hidden_in, logits, ids, hidden_out, 0, 1, NULL, e);
}
