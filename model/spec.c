#include "model/spec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int ds_spec_req_init(ds_spec_req *r, const ds_engine *eng, ds_seq *seq, ds_sampler *smp, int greedy, int depth)
{
	const ds_model *m = ds_engine_model(eng);
	memset(r, 0, sizeof(*r));
	if (depth < 0 || depth > DS_SPEC_MAX_DEPTH)
		return -EINVAL;
	r->seq = seq;
	r->smp = smp;
	r->greedy = greedy;
	r->depth = m->n_mtp > 0 ? depth : 0;
	r->want = 1;
	if (r->depth) {
		r->q = malloc(sizeof(float) * (size_t)r->depth * m->cfg.vocab_size);
		if (!r->q)
			return -ENOMEM;
	}
	return 0;
}

void ds_spec_req_clear(ds_spec_req *r)
{
	free(r->q);
	r->q = NULL;
}


/* Draws from p (or takes its argmax when greedy) with the request's RNG. */
static int32_t pick(ds_spec_req *r, const float *p, int V)
{
	return r->greedy ? ds_argmax(p, V) : ds_sampler_draw(r->smp, p);
}

/* Greedy without penalties: every choice is a logit row's argmax, which the
 * engine returns as an id (on a GPU the rows then stay there). */
static int plain(const ds_spec_req *r) { return ds_sampling_plain_greedy(ds_sampler_params(r->smp)); }

/* r drafts now: it wants to, and the drafts fit the context (positions up
 * to len + depth). */
static int drafts_now(const ds_spec_req *r, int max_pos)
{
	return r->want && ds_seq_len(r->seq) + 1 + r->depth <= max_pos;
}

/* Step buffers, grown as needed; ds_spec_ws keeps one across calls. */
typedef struct {
	ds_step_item *items;
	float *logits, *hidden, *hidden2, *probs;
	int32_t *toks, *ids;
	int *idx, *nt;
	const int32_t **tk;
	const float **hp;
	int cap_n, cap_rows, cap_lrows;
} scratch;

struct ds_spec_ws {
	scratch s;
};

static void scratch_free(scratch *s)
{
	free(s->items);
	free(s->logits);
	free(s->ids);
	free(s->hidden);
	free(s->hidden2);
	free(s->probs);
	free(s->toks);
	free(s->idx);
	free(s->nt);
	free(s->tk);
	free(s->hp);
}

/* MTP over positions [n_mtp, n_mtp + ntok[i]) of each request with depth >
 * 0, whose tokens (the token after each position) are in toks and whose main
 * hidden states are rows of hid; then, for requests with `want` set, drafts
 * r->depth tokens, chaining the module on its own output for depth > 1. */
static int draft(ds_engine *eng, ds_spec_req **reqs, int n, const int32_t *const *toks, const int *ntok,
		 const float *const *hid, scratch *s, ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	int k = 0, rows = 0, nd = 0;
	int *idx = s->idx;
	for (int i = 0; i < n; i++) {
		ds_spec_req *r = reqs[i];
		r->n_draft = 0;
		if (!r->depth || ntok[i] <= 0)
			continue;
		const int d = drafts_now(r, m->cfg.max_position_embeddings);
		s->items[k] = (ds_step_item){ .seq = r->seq, .tokens = toks[i], .n = ntok[i],
					      .logits = d ? DS_LOGITS_LAST : DS_LOGITS_NONE, .argmax_only = plain(r) };
		memcpy(s->hidden2 + (size_t)rows * H, hid[i], sizeof(float) * (size_t)H * ntok[i]);
		rows += ntok[i];
		idx[k++] = i;
		nd += d;
	}
	if (!k)
		return 0;
	float *hout = s->hidden;
	int rc = nd ? ds_engine_mtp_step_ids(eng, 0, s->items, k, s->hidden2, s->logits, s->ids, hout, e)
		    : ds_engine_mtp_step(eng, 0, s->items, k, s->hidden2, NULL, hout, e);
	if (rc || !nd)
		return rc;
	/* keep the drafting items only; the last hidden row of each is the
	 * chain's input */
	int k2 = 0, row = 0;
	for (int j = 0; j < k; j++) {
		row += s->items[j].n;
		if (s->items[j].logits == DS_LOGITS_NONE)
			continue;
		memmove(s->hidden2 + (size_t)k2 * H, hout + (size_t)(row - 1) * H, sizeof(float) * (size_t)H);
		s->items[k2] = s->items[j];
		idx[k2++] = idx[j];
	}
	k = k2;
	for (int d = 0;; d++) {
		for (int j = 0; j < k; j++) {
			ds_spec_req *r = reqs[idx[j]];
			if (plain(r)) { /* q is for rejection sampling only */
				r->draft[d] = s->ids[j];
			} else {
				float *q = r->q + (size_t)d * V;
				ds_sampler_probs(r->smp, s->logits + (size_t)j * V, q);
				r->draft[d] = pick(r, q, V);
			}
			r->n_draft = d + 1;
			r->drafted++;
		}
		/* chained drafting: only requests that want another draft */
		k2 = 0;
		for (int j = 0; j < k; j++) {
			ds_spec_req *r = reqs[idx[j]];
			if (r->depth <= d + 1)
				continue;
			s->items[k2] = (ds_step_item){ .seq = r->seq, .tokens = &r->draft[d], .n = 1, .logits = DS_LOGITS_LAST,
						       .argmax_only = plain(r) };
			if (d > 0) /* chain input: the previous MTP output, row j */
				memcpy(s->hidden2 + (size_t)k2 * H, hout + (size_t)j * H, sizeof(float) * (size_t)H);
			else
				memmove(s->hidden2 + (size_t)k2 * H, s->hidden2 + (size_t)j * H, sizeof(float) * (size_t)H);
			idx[k2++] = idx[j];
		}
		if (!k2)
			break;
		k = k2;
		if ((rc = ds_engine_mtp_step_ids(eng, 0, s->items, k, s->hidden2, s->logits, s->ids, hout, e)))
			return rc;
	}
	return 0;
}

static int grow_buf(void *pp, size_t elem, int n)
{
	void *q = realloc(*(void **)pp, elem * (size_t)(n > 0 ? n : 1));
	if (!q)
		return -ENOMEM;
	*(void **)pp = q;
	return 0;
}

/* Room for n items, rows tokens and lrows rows of logits; keeps what it has
 * when that is enough. On failure s stays valid (scratch_free frees it). */
static int scratch_reserve(scratch *s, const ds_model *m, int n, int rows, int lrows)
{
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	if (!s->probs && grow_buf(&s->probs, sizeof(float), V))
		return -ENOMEM;
	if (n > s->cap_n) {
		if (grow_buf(&s->items, sizeof(ds_step_item), n) || grow_buf(&s->idx, sizeof(int), n) ||
		    grow_buf(&s->nt, sizeof(int), n) || grow_buf(&s->tk, sizeof(*s->tk), n) ||
		    grow_buf(&s->hp, sizeof(*s->hp), n))
			return -ENOMEM;
		s->cap_n = n;
	}
	if (rows > s->cap_rows) {
		if (grow_buf(&s->hidden, sizeof(float) * (size_t)H, rows) ||
		    grow_buf(&s->hidden2, sizeof(float) * (size_t)H, rows) || grow_buf(&s->toks, sizeof(int32_t), rows))
			return -ENOMEM;
		s->cap_rows = rows;
	}
	if (lrows > s->cap_lrows) {
		if (grow_buf(&s->logits, sizeof(float) * (size_t)V, lrows) || grow_buf(&s->ids, sizeof(int32_t), lrows))
			return -ENOMEM;
		s->cap_lrows = lrows;
	}
	return 0;
}

int ds_spec_prefill(ds_engine *eng, ds_spec_req **reqs, const int32_t *const *prompts, const int *lens, int n,
		    ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	int rows = 0;
	for (int i = 0; i < n; i++)
		rows += lens[i];
	scratch s = { 0 };
	if (scratch_reserve(&s, m, n, rows + n, n)) {
		scratch_free(&s);
		return -ENOMEM;
	}
	for (int i = 0; i < n; i++)
		s.items[i] = (ds_step_item){ .seq = reqs[i]->seq, .tokens = prompts[i], .n = lens[i], .logits = DS_LOGITS_LAST };
	float *hid = malloc(sizeof(float) * (size_t)H * rows);
	int rc = hid ? ds_engine_step(eng, s.items, n, s.logits, hid, e) : -ENOMEM;
	if (rc)
		goto out;
	const int32_t **tk = s.tk;
	int *nt = s.nt;
	const float **hp = s.hp;
	int32_t *tbuf = malloc(sizeof(int32_t) * (size_t)rows);
	if (!tbuf) {
		rc = -ENOMEM;
		goto out;
	}
	for (int i = 0, off = 0; i < n; i++) {
		ds_spec_req *r = reqs[i];
		ds_sampler_probs(r->smp, s.logits + (size_t)i * V, s.probs);
		r->last = pick(r, s.probs, V);
		ds_sampler_accept(r->smp, r->last);
		r->out[0] = r->last;
		r->n_out = 1;
		/* MTP inputs for the positions this step added (n_mtp is where they
		 * start: 0, or the end of an adopted prefix): the token after each,
		 * i.e. the prompt shifted by one, then the sampled token */
		memcpy(tbuf + off, prompts[i] + 1, sizeof(int32_t) * (size_t)(lens[i] - 1));
		tbuf[off + lens[i] - 1] = r->last;
		tk[i] = tbuf + off;
		nt[i] = lens[i];
		hp[i] = hid + (size_t)off * H;
		off += lens[i];
		if (ds_seq_mtp_len(r->seq) != ds_seq_len(r->seq) - lens[i])
			r->depth = 0; /* MTP context does not line up: plain decoding */
	}
	rc = draft(eng, reqs, n, tk, nt, hp, &s, e);
	free(tbuf);
out:
	free(hid);
	scratch_free(&s);
	return rc;
}

/* Drafts [0, j) were accepted (in out, sampler updated); x follows them.
 * Keeps `last` and the accepted drafts in the main cache, drops the rest;
 * the MTP cache keeps at most mtp_keep positions. */
static int settle(ds_spec_req *r, int L, int j, int32_t x, int mtp_keep)
{
	ds_sampler_accept(r->smp, x);
	r->out[j] = x;
	r->n_out = j + 1;
	r->steps++;
	r->n_draft = 0;
	r->last = x;
	int rc = ds_seq_truncate(r->seq, L + 1 + j);
	if (!rc)
		rc = ds_seq_mtp_truncate(r->seq, mtp_keep < ds_seq_mtp_len(r->seq) ? mtp_keep : ds_seq_mtp_len(r->seq));
	return rc;
}

int ds_spec_verify(ds_spec_req *r, const float *logits, int V, float *probs)
{
	const int L = ds_seq_len(r->seq) - 1 - r->n_draft; /* position of `last` */
	int j = 0;
	int32_t x = -1;
	if (L < 0)
		return -EINVAL;
	for (; j < r->n_draft; j++) {
		ds_sampler_probs(r->smp, logits + (size_t)j * V, probs);
		const int32_t d = r->draft[j];
		const float *q = r->q + (size_t)j * V;
		int ok;
		if (r->greedy) {
			x = ds_argmax(probs, V);
			ok = x == d;
		} else {
			/* accept d with probability min(1, p(d)/q(d)); otherwise draw from
			 * the normalized residual max(0, p - q) */
			ok = ds_sampler_uniform(r->smp) * q[d] < probs[d];
			if (!ok) {
				double z = 0;
				for (int v = 0; v < V; v++) {
					float dv = probs[v] - q[v];
					probs[v] = dv > 0 ? dv : 0;
					z += probs[v];
				}
				if (z > 0) {
					for (int v = 0; v < V; v++)
						probs[v] = (float)(probs[v] / z);
					x = ds_sampler_draw(r->smp, probs);
				} else {
					x = d; /* p == q: cannot reject */
					ok = 1;
				}
			}
		}
		if (!ok)
			break;
		r->out[j] = d;
		ds_sampler_accept(r->smp, d);
		r->accepted++;
	}
	if (j == r->n_draft) { /* all drafts accepted: the bonus token */
		ds_sampler_probs(r->smp, logits + (size_t)j * V, probs);
		x = pick(r, probs, V);
	}
	return settle(r, L, j, x, L);
}

/* Greedy acceptance by ids: the drafts equal to the main model's choices. */
static int accept_ids(ds_spec_req *r, const int32_t *ids)
{
	int j = 0;
	for (; j < r->n_draft && ids[j] == r->draft[j]; j++) {
		r->out[j] = r->draft[j];
		ds_sampler_accept(r->smp, r->draft[j]);
		r->accepted++;
	}
	return j;
}

int ds_spec_verify_ids(ds_spec_req *r, const int32_t *ids)
{
	const int L = ds_seq_len(r->seq) - 1 - r->n_draft;
	if (L < 0 || !plain(r))
		return -EINVAL;
	const int j = accept_ids(r, ids);
	return settle(r, L, j, ids[j], L);
}

int ds_spec_chainable(const ds_spec_req *r, int max_pos)
{
	/* the verify step's positions and the deeper passes' ones ahead */
	return r->depth >= 1 && r->want && plain(r) && ds_seq_mtp_len(r->seq) >= ds_seq_len(r->seq) &&
	       ds_seq_len(r->seq) + 1 + r->n_draft + r->depth - 1 <= max_pos;
}

int ds_spec_verify_chained(ds_spec_req *r, const int32_t *ids, const int32_t *mtp_ids, const int32_t *deep,
			   int deep_stride, int max_pos)
{
	const int L = ds_seq_len(r->seq) - 1 - r->n_draft;
	if (L < 0 || !plain(r) || r->depth < 1)
		return -EINVAL;
	const int j = accept_ids(r, ids);
	if (ds_seq_mtp_len(r->seq) < L + 1 + j)
		return -EINVAL;
	/* MTP position L + j took x = ids[j], the token after it: its row
	 * drafts the token after x, the deeper passes the ones after that */
	int rc = settle(r, L, j, ids[j], L + 1 + j);
	if (!rc && drafts_now(r, max_pos)) {
		r->draft[0] = mtp_ids[j];
		for (int k = 1; k < r->depth; k++)
			r->draft[k] = deep[(size_t)(k - 1) * deep_stride];
		r->n_draft = r->depth;
		r->drafted += (uint64_t)r->depth;
	}
	return rc;
}

int ds_spec_extend(ds_engine *eng, ds_spec_ws **ws, ds_spec_req **reqs, int n, const int32_t *const *toks,
		   const int *ntok, const float *const *hid, ds_err *e)
{
	int rows = 0;
	for (int i = 0; i < n; i++)
		rows += ntok[i] > 0 ? ntok[i] : 0;
	if (!*ws && !(*ws = calloc(1, sizeof(**ws))))
		return ds_errf(e, -ENOMEM, "out of memory");
	if (scratch_reserve(&(*ws)->s, ds_engine_model(eng), n, rows > n ? rows : n, n))
		return ds_errf(e, -ENOMEM, "out of memory");
	return draft(eng, reqs, n, toks, ntok, hid, &(*ws)->s, e);
}

ds_spec_ws *ds_spec_ws_free(ds_spec_ws *ws)
{
	if (ws) {
		scratch_free(&ws->s);
		free(ws);
	}
	return NULL;
}

int ds_spec_step(ds_engine *eng, ds_spec_req **reqs, int n, ds_err *e)
{
	const ds_model *m = ds_engine_model(eng);
	const int V = m->cfg.vocab_size, H = m->cfg.hidden_size;
	int rows = 0;
	for (int i = 0; i < n; i++)
		rows += 1 + reqs[i]->n_draft;
	scratch s = { 0 };
	if (scratch_reserve(&s, m, n, rows, rows)) {
		scratch_free(&s);
		return -ENOMEM;
	}
	int32_t *in = malloc(sizeof(int32_t) * (size_t)rows);
	int32_t *mids = malloc(sizeof(int32_t) * (size_t)(rows + DS_SPEC_MAX_DEPTH * n));
	float *hid = malloc(sizeof(float) * (size_t)H * rows);
	ds_spec_req **rest = malloc(sizeof(*rest) * (size_t)n);
	int *ord = malloc(sizeof(int) * (size_t)n);
	int rc = (in && mids && hid && rest && ord) ? 0 : -ENOMEM;
	if (rc)
		goto out;
	/* Chainable requests first: the engine drafts for them in the same
	 * call (ds_engine_step_chain), at one depth, the first one's; the
	 * others draft below. */
	int nc = 0, k = 0, depth = 0, tc = 0;
	const int chain = ds_engine_chains(eng), max_pos = m->cfg.max_position_embeddings;
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < n; i++) {
			ds_spec_req *r = reqs[i];
			const int c = chain && ds_spec_chainable(r, max_pos) && (!depth || r->depth == depth);
			if (c && !depth)
				depth = r->depth;
			if (c && pass == 0) /* host-chained drafts ran the MTP KV ahead: pass 1 redoes it */
				ds_seq_mtp_truncate(r->seq, ds_seq_len(r->seq));
			if (c == !pass) {
				ord[k++] = i;
				nc += !pass;
				tc += c ? 1 + r->n_draft : 0;
			}
		}
	for (int k2 = 0, off = 0; k2 < n; k2++) {
		ds_spec_req *r = reqs[ord[k2]];
		in[off] = r->last;
		memcpy(in + off + 1, r->draft, sizeof(int32_t) * (size_t)r->n_draft);
		s.items[k2] = (ds_step_item){ .seq = r->seq, .tokens = in + off, .n = 1 + r->n_draft,
					      .logits = DS_LOGITS_ALL, .argmax_only = plain(r) };
		off += 1 + r->n_draft;
	}
	if ((rc = ds_engine_step_chain(eng, s.items, n, nc, depth ? depth : 1, s.logits, s.ids, mids, hid, e)))
		goto out;
	const int32_t **tk = s.tk;
	int *nt = s.nt;
	const float **hp = s.hp;
	int nr = 0;
	for (int k2 = 0, off = 0; k2 < n; k2++) {
		ds_spec_req *r = reqs[ord[k2]];
		const int rows_i = s.items[k2].n;
		if (k2 < nc) {
			rc = ds_spec_verify_chained(r, s.ids + off, mids + off, mids + tc + k2, nc, max_pos);
		} else {
			rc = plain(r) ? ds_spec_verify_ids(r, s.ids + off)
				      : ds_spec_verify(r, s.logits + (size_t)off * V, V, s.probs);
			/* MTP positions L .. L+j take the tokens after them: drafts 1..j, x */
			memcpy(s.toks + off, r->out, sizeof(int32_t) * (size_t)r->n_out);
			rest[nr] = r;
			tk[nr] = s.toks + off;
			nt[nr] = r->n_out;
			hp[nr++] = hid + (size_t)off * H;
		}
		if (rc)
			goto out;
		off += rows_i;
	}
	rc = nr ? draft(eng, rest, nr, tk, nt, hp, &s, e) : 0;
out:
	free(in);
	free(mids);
	free(hid);
	free(rest);
	free(ord);
	scratch_free(&s);
	return rc;
}
