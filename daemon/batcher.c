#include "daemon/batcher.h"

#include <errno.h>
#include <math.h>
#include <msgpack.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "cache/kvm.h"
#include "daemon/log.h"
#include "ipc/proto.h"

#define NSAMPLES 1024

enum { CMD_SUBMIT = 1, CMD_CANCEL, CMD_CANCEL_ALL, CMD_GONE, CMD_FLUSH };

typedef struct cmd {
	int kind;
	ds_req *r;
	uint64_t id;
	ds_conn *c;
	struct cmd *next;
} cmd;

struct ds_pend {
	ds_pend *next;
	ds_ring_event ev;
	ds_ring_stats st;
	ds_ring_top top[DS_RING_MAX_TOP];
	char text[];
};

typedef struct samples {
	float v[NSAMPLES];
	uint64_t n;
} samples;

struct ds_batcher {
	ds_engine *eng;
	const ds_model *m;
	const ds_tok *tok;
	ds_batcher_cfg cfg;
	int V, max_ctx, out_efd;
	pthread_t th;
	int started;
	/* inbox */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	cmd *inbox;
	int poked, quit;
	/* outbox */
	pthread_mutex_t out_mu;
	ds_out_msg *out_head, *out_tail;
	ds_out_msg *loc_head, *loc_tail; /* this iteration's, engine thread only */
	/* engine thread */
	ds_sched *sched;
	ds_prefix *pc;           /* NULL with the prefix cache off */
	ds_req *reqs;
	ds_step_item *items;
	ds_req **item_req;
	int items_cap;
	int stepping;            /* inside step(): finished requests stay until its end */
	float *logits, *probs, *hidden;
	int32_t *ids; /* argmax of each logit row */
	int32_t *mids; /* chained items' MTP argmax rows, then the deeper passes' (ds_engine_step_chain) */
	size_t mids_cap;
	int n_chain;   /* items [0, n_chain) of a step are chained */
	int chain_rows; /* their rows */
	int chain;     /* chained steps in use (cfg.mtp_chain) */
	/* Host-sampled rows, drawn before the step's tokens are emitted: per
	 * item its logit row (-1: none) and token; one probs row a thread. */
	int *pre_row;
	int32_t *pre_tok;
	float *tprobs;
	int tprobs_n;
	size_t logits_rows, hidden_rows;
	/* ds_spec_extend's arguments, one per item */
	ds_spec_req **x_req;
	const int32_t **x_tok;
	const float **x_hid;
	int *x_n;
	ds_req **x_owner;
	ds_spec_ws *spec_ws;
	uint64_t mtp_drafted, mtp_accepted, decode_steps, decode_tokens;
	uint64_t *eload;         /* [layers][experts], ds_engine_expert_load */
	double eload_t;
	samples ttft, tpot;
	uint64_t gen_total;
	int samples_dirty;
	double tps_t[11];
	uint64_t tps_g[11];
	int tps_i;
	uint64_t wd_usec;
	double wd_last;
	/* published for the loop */
	pthread_mutex_t st_mu;
	ds_batcher_stats st;
	ds_ps_entry *ps;
	int n_ps;
};

/* ---- requests ---- */

static void pend_free_all(ds_req *r)
{
	while (r->pend_head) {
		ds_pend *p = r->pend_head;
		r->pend_head = p->next;
		free(p);
	}
	r->pend_tail = NULL;
}

void ds_req_free(ds_req *r)
{
	if (!r)
		return;
	ds_seq_free(r->seq);
	ds_sampler_free(r->smp);
	ds_spec_req_clear(&r->spec);
	ds_tok_stream_free(r->ts);
	pend_free_all(r);
	free(r->hold);
	free(r->tokens);
	free(r->stop_ids);
	for (int i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	free(r->stop);
	ds_conn_unref(r->conn);
	free(r);
}

/* ---- output ---- */

static void out_push(ds_batcher *b, int kind, ds_conn *c, uint64_t id, uint8_t *buf, size_t len)
{
	ds_out_msg *m = calloc(1, sizeof(*m));
	if (!m) {
		free(buf);
		return; /* out of memory: the event is lost, the daemon goes on */
	}
	m->kind = kind;
	m->conn = ds_conn_ref(c);
	m->req_id = id;
	m->buf = buf;
	m->len = len;
	if (b->loc_tail)
		b->loc_tail->next = m;
	else
		b->loc_head = m;
	b->loc_tail = m;
}

static void out_flush(ds_batcher *b)
{
	if (!b->loc_head)
		return;
	pthread_mutex_lock(&b->out_mu);
	if (b->out_tail)
		b->out_tail->next = b->loc_head;
	else
		b->out_head = b->loc_head;
	b->out_tail = b->loc_tail;
	pthread_mutex_unlock(&b->out_mu);
	b->loc_head = b->loc_tail = NULL;
	uint64_t one = 1;
	ssize_t w = write(b->out_efd, &one, sizeof(one));
	(void)w;
}

void ds_out_msg_free(ds_out_msg *m)
{
	if (!m)
		return;
	ds_conn_unref(m->conn);
	free(m->buf);
	free(m);
}

ds_out_msg *ds_batcher_take(ds_batcher *b)
{
	pthread_mutex_lock(&b->out_mu);
	ds_out_msg *m = b->out_head;
	b->out_head = b->out_tail = NULL;
	pthread_mutex_unlock(&b->out_mu);
	return m;
}

static const char *finish_name(int f)
{
	static const char *const names[] = { "", "stop", "length", "cancelled", "error" };
	return f >= 0 && f <= 4 ? names[f] : "";
}

/* The same event as a msgpack notification for clients without a ring. */
static int pack_event(const ds_ring_event *ev, uint8_t **buf, size_t *len)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	ds_ipc_pack_notify_head(&pk, "event");
	int final = ev->type == DS_REC_FINAL;
	int n = 4 + (!isnan(ev->logprob)) + (ev->n_top > 0) + (final ? 2 : 0);
	msgpack_pack_map(&pk, (size_t)n);
	ds_mp_pack_str(&pk, "id");
	msgpack_pack_uint64(&pk, ev->request_id);
	ds_mp_pack_str(&pk, "seq");
	msgpack_pack_uint32(&pk, ev->seq);
	ds_mp_pack_str(&pk, "token");
	if (ev->token < 0)
		msgpack_pack_nil(&pk);
	else
		msgpack_pack_int32(&pk, ev->token);
	ds_mp_pack_str(&pk, final && ev->finish == DS_FINISH_ERROR ? "error" : "text");
	ds_mp_pack_strn(&pk, ev->text ? ev->text : "", ev->text_len);
	if (!isnan(ev->logprob)) {
		ds_mp_pack_str(&pk, "logprob");
		msgpack_pack_float(&pk, ev->logprob);
	}
	if (ev->n_top > 0) {
		ds_mp_pack_str(&pk, "top");
		msgpack_pack_array(&pk, (size_t)ev->n_top);
		for (int i = 0; i < ev->n_top; i++) {
			msgpack_pack_array(&pk, 2);
			msgpack_pack_int32(&pk, ev->top[i].token);
			msgpack_pack_float(&pk, ev->top[i].logprob);
		}
	}
	if (final) {
		ds_mp_pack_str(&pk, "finish");
		ds_mp_pack_str(&pk, finish_name(ev->finish));
		const ds_ring_stats *s = ev->stats;
		ds_mp_pack_str(&pk, "stats");
		msgpack_pack_map(&pk, 9);
		ds_mp_pack_str(&pk, "prompt_tokens");
		msgpack_pack_uint32(&pk, s->prompt_tokens);
		ds_mp_pack_str(&pk, "generated_tokens");
		msgpack_pack_uint32(&pk, s->generated_tokens);
		ds_mp_pack_str(&pk, "cached_tokens");
		msgpack_pack_uint32(&pk, s->cached_tokens);
		ds_mp_pack_str(&pk, "drafted");
		msgpack_pack_uint32(&pk, s->drafted);
		ds_mp_pack_str(&pk, "accepted");
		msgpack_pack_uint32(&pk, s->accepted);
		ds_mp_pack_str(&pk, "ttft_ns");
		msgpack_pack_uint64(&pk, s->ttft_ns);
		ds_mp_pack_str(&pk, "total_ns");
		msgpack_pack_uint64(&pk, s->total_ns);
		ds_mp_pack_str(&pk, "prefill_ns");
		msgpack_pack_uint64(&pk, s->prefill_ns);
		ds_mp_pack_str(&pk, "decode_ns");
		msgpack_pack_uint64(&pk, s->decode_ns);
	}
	*len = sb.size;
	*buf = (uint8_t *)msgpack_sbuffer_release(&sb);
	return *buf ? 0 : -ENOMEM;
}

/* 0 delivered (or dropped: the client is gone), -EAGAIN when the stream
 * must pause until the client reads. */
static int deliver(ds_batcher *b, ds_req *r, const ds_ring_event *ev)
{
	ds_conn *c = r->conn;
	if (atomic_load(&c->gone))
		return 0;
	if (r->use_ring) {
		int rc = ds_ring_put(c->ring, ev);
		if (rc == -EAGAIN)
			return -EAGAIN;
		if (rc == -EPROTO) {
			ds_log(DS_LOG_WARNING, "client %llu (pid %d) corrupted its ring; closing it",
			       (unsigned long long)c->id, (int)c->pid);
			atomic_store(&c->gone, 1);
			out_push(b, DS_OUT_CLOSE, c, 0, NULL, 0);
		}
		return 0;
	}
	if (atomic_load(&c->out_bytes) > b->cfg.sock_budget) {
		/* Dekker with the loop: it lowers out_bytes, then reads want_resume. */
		atomic_store(&c->want_resume, 1);
		if (atomic_load(&c->out_bytes) > b->cfg.sock_budget)
			return -EAGAIN;
	}
	uint8_t *buf;
	size_t len;
	if (pack_event(ev, &buf, &len))
		return 0;
	atomic_fetch_add(&c->out_bytes, (long)len);
	out_push(b, DS_OUT_BYTES, c, r->id, buf, len);
	return 0;
}

static void emit(ds_batcher *b, ds_req *r, const ds_ring_event *ev)
{
	if (!r->pend_head && deliver(b, r, ev) == 0)
		return;
	ds_pend *p = malloc(sizeof(*p) + ev->text_len);
	if (!p)
		return;
	p->next = NULL;
	p->ev = *ev;
	if (ev->stats) {
		p->st = *ev->stats;
		p->ev.stats = &p->st;
	}
	if (ev->n_top)
		memcpy(p->top, ev->top, sizeof(ds_ring_top) * (size_t)ev->n_top);
	p->ev.top = p->top;
	if (ev->text_len)
		memcpy(p->text, ev->text, ev->text_len);
	p->ev.text = p->text;
	if (r->pend_tail)
		r->pend_tail->next = p;
	else
		r->pend_head = p;
	r->pend_tail = p;
}

/* ---- request life ---- */

static void leave_engine(ds_batcher *b, ds_req *r)
{
	if (r->in_sched) {
		ds_sched_remove(b->sched, &r->sr);
		r->in_sched = 0;
	}
	r->seq = ds_seq_free(r->seq);
	r->smp = ds_sampler_free(r->smp);
}

static void unlink_req(ds_batcher *b, ds_req *r)
{
	for (ds_req **pp = &b->reqs; *pp; pp = &(*pp)->next)
		if (*pp == r) {
			*pp = r->next;
			return;
		}
}

/* Leaves the engine's list; the loop learns through DS_OUT_DONE. */
static void retire(ds_batcher *b, ds_req *r)
{
	unlink_req(b, r);
	out_push(b, DS_OUT_DONE, r->conn, r->id, NULL, 0);
	ds_req_free(r);
}

static void sample_add(samples *s, double v)
{
	s->v[s->n++ % NSAMPLES] = (float)v;
}

static void finish(ds_batcher *b, ds_req *r, int why, const char *msg)
{
	if (r->finished)
		return;
	double now = ds_now();
	char *tail = NULL;
	size_t tail_len = 0;
	if (why == DS_FINISH_ERROR) {
		tail_len = strlen(msg);
		tail = strdup(msg);
	} else if (why != DS_FINISH_CANCELLED) {
		const char *fl = NULL;
		size_t fn = 0;
		if (r->ts)
			ds_tok_stream_flush(r->ts, &fl, &fn);
		tail = malloc(r->hold_len + fn + 1);
		if (tail) {
			memcpy(tail, r->hold ? r->hold : "", r->hold_len);
			if (fn)
				memcpy(tail + r->hold_len, fl, fn);
			tail_len = r->hold_len + fn;
		}
	}
	if (tail_len > DS_RING_MAX_TEXT)
		tail_len = ds_utf8_complete(tail, DS_RING_MAX_TEXT);
	ds_prefix_account(b->pc, r->n_prompt, r->hit_tokens);
	ds_ring_stats st = {
		.prompt_tokens = (uint32_t)r->n_prompt,
		.generated_tokens = (uint32_t)r->n_gen,
		.cached_tokens = (uint32_t)r->hit_tokens,
		.drafted = r->drafted,
		.accepted = r->accepted,
		.ttft_ns = r->t_first > 0 ? (uint64_t)((r->t_first - r->t_arrive) * 1e9) : 0,
		.total_ns = (uint64_t)((now - r->t_arrive) * 1e9),
		.prefill_ns = r->t_prefill_done > 0 ? (uint64_t)((r->t_prefill_done - r->t_arrive) * 1e9) : 0,
		.decode_ns = r->t_first > 0 ? (uint64_t)((now - r->t_first) * 1e9) : 0,
	};
	ds_ring_event ev = {
		.type = DS_REC_FINAL, .finish = why, .request_id = r->id, .seq = r->seq_no++, .token = -1,
		.logprob = NAN, .text = tail, .text_len = tail ? (uint32_t)tail_len : 0, .stats = &st,
	};
	emit(b, r, &ev);
	free(tail);
	r->finished = 1;
	if (!b->stepping) /* else step() lets its MTP layer catch up first */
		leave_engine(b, r);
	r->ts = ds_tok_stream_free(r->ts);
	pthread_mutex_lock(&b->st_mu);
	if (why == DS_FINISH_CANCELLED)
		b->st.cancelled++;
	else if (why == DS_FINISH_ERROR)
		b->st.failed++;
	else
		b->st.completed++;
	pthread_mutex_unlock(&b->st_mu);
	if (r->t_first > 0) {
		sample_add(&b->ttft, (r->t_first - r->t_arrive) * 1e3);
		if (r->n_gen > 1)
			sample_add(&b->tpot, (now - r->t_first) * 1e3 / (r->n_gen - 1));
		b->samples_dirty = 1;
	}
	if (!r->pend_head && !b->stepping)
		retire(b, r);
}

static void drop(ds_batcher *b, ds_req *r)
{
	leave_engine(b, r);
	retire(b, r);
}

/* Appends piece to the held-back text; returns how much of the hold can
 * go out now, or sets *stop when a stop string matched (the text before it
 * goes out, the rest is dropped). */
static size_t text_push(ds_req *r, const char *piece, size_t n, int *stop)
{
	if (r->hold_len + n > r->hold_cap) {
		size_t cap = (r->hold_len + n) * 2 + 64;
		char *h = realloc(r->hold, cap);
		if (!h)
			return 0;
		r->hold = h;
		r->hold_cap = cap;
	}
	memcpy(r->hold + r->hold_len, piece, n);
	r->hold_len += n;
	size_t best = SIZE_MAX;
	for (int i = 0; i < r->n_stop; i++) {
		const char *f = memmem(r->hold, r->hold_len, r->stop[i], strlen(r->stop[i]));
		if (f && (size_t)(f - r->hold) < best)
			best = (size_t)(f - r->hold);
	}
	if (best != SIZE_MAX) {
		*stop = 1;
		return best;
	}
	size_t keep = r->stop_max > 0 ? r->stop_max - 1 : 0;
	size_t out = r->hold_len > keep ? r->hold_len - keep : 0;
	return ds_utf8_complete(r->hold, out);
}

static void on_token(ds_batcher *b, ds_req *r, int32_t tok, float lp, const ds_ring_top *top, int n_top)
{
	r->tokens[r->sr.n_tokens++] = tok;
	r->n_gen++;
	b->gen_total++;
	if (r->n_gen == 1)
		r->t_first = ds_now();
	const char *piece = "";
	size_t plen = 0;
	if (r->ts && ds_tok_stream_push(r->ts, tok, &piece, &plen, NULL)) {
		piece = "";
		plen = 0;
	}
	int why = DS_FINISH_NONE;
	if (!r->ignore_eos && tok == b->m->cfg.eos_token_id)
		why = DS_FINISH_STOP;
	for (int i = 0; i < r->n_stop_ids; i++)
		if (tok == r->stop_ids[i])
			why = DS_FINISH_STOP;
	const char *text = piece;
	size_t tlen = plen;
	size_t consumed = 0;
	if (r->n_stop) {
		int hit = 0;
		tlen = text_push(r, piece, plen, &hit);
		text = r->hold;
		consumed = hit ? r->hold_len : tlen;
		if (hit)
			why = DS_FINISH_STOP;
	}
	if (!why && (r->n_gen >= r->max_tokens || r->sr.n_tokens >= b->max_ctx))
		why = DS_FINISH_LENGTH;
	ds_ring_event ev = {
		.type = DS_REC_TOKEN, .request_id = r->id, .seq = r->seq_no++, .token = tok, .logprob = lp,
		.text = text, .text_len = (uint32_t)(tlen > DS_RING_MAX_TEXT ? ds_utf8_complete(text, DS_RING_MAX_TEXT) : tlen),
		.top = top, .n_top = n_top,
	};
	emit(b, r, &ev);
	if (consumed) {
		memmove(r->hold, r->hold + consumed, r->hold_len - consumed);
		r->hold_len -= consumed;
	}
	if (why)
		finish(b, r, why, NULL);
}


/* Emits tok, with its logprob and the top alternatives under row (the
 * main model's logits at tok's position) when the request asked for them. */
static void token_out(ds_batcher *b, ds_req *r, const float *row, int32_t tok)
{
	float lp = NAN;
	ds_ring_top top[DS_RING_MAX_TOP];
	int n_top = 0;
	if (r->logprobs) {
		float mx = row[ds_argmax(row, b->V)];
		double s = 0;
		for (int i = 0; i < b->V; i++)
			s += exp((double)row[i] - mx);
		double lse = mx + log(s);
		n_top = r->logprobs > 0 ? r->logprobs : 0;
		if (n_top > b->V)
			n_top = b->V;
		for (int k = 0; k < n_top; k++) { /* n_top <= 32: selection is cheap */
			int best = -1;
			for (int i = 0; i < b->V; i++) {
				int taken = 0;
				for (int j = 0; j < k && !taken; j++)
					taken = top[j].token == i;
				if (!taken && (best < 0 || row[i] > row[best]))
					best = i;
			}
			top[k].token = best;
			top[k].logprob = (float)(row[best] - lse);
		}
		lp = (float)(row[tok] - lse);
	}
	on_token(b, r, tok, lp, top, n_top);
}

/* Same draw as dsd generate (and model/spec.c): the sampler's distribution,
 * argmax when greedy, else one draw from the request's RNG. */
static int32_t draw_row(ds_req *r, const float *row, float *probs, int V)
{
	ds_sampler_probs(r->smp, row, probs);
	int32_t tok = r->sp.temperature == 0 ? ds_argmax(probs, V) : ds_sampler_draw(r->smp, probs);
	ds_sampler_accept(r->smp, tok);
	return tok;
}

/* Draws the token of every row the host samples this step (penalties,
 * logprobs, or a backend that does not draw), the rows in parallel: each
 * belongs to another request, with its own sampler and RNG, so the tokens
 * do not depend on the threads (a row costs 1-3 ms on a 129K vocabulary:
 * one thread would bound large batches). Emission stays in item order. */
static void presample(ds_batcher *b, int n)
{
	int cnt = 0;
	for (int i = 0, row = 0; i < n; i++) {
		const ds_step_item *it = &b->items[i];
		b->pre_row[i] = -1;
		if (it->tokens == b->item_req[i]->vin) {
			row += it->n;
		} else if (it->logits == DS_LOGITS_LAST) {
			if (!it->argmax_only && !it->draw) {
				b->pre_row[i] = row;
				cnt++;
			}
			row++;
		}
	}
	int nt = cnt > 1 ? omp_get_max_threads() : 1;
	if (nt > cnt)
		nt = cnt;
	if (nt > 1 && nt > b->tprobs_n) {
		float *t = realloc(b->tprobs, sizeof(float) * (size_t)nt * b->V);
		if (t) {
			b->tprobs = t;
			b->tprobs_n = nt;
		}
	}
	if (nt > b->tprobs_n)
		nt = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
	for (int i = 0; i < n; i++) {
		if (b->pre_row[i] < 0)
			continue;
		float *probs = nt > 1 ? b->tprobs + (size_t)omp_get_thread_num() * b->V : b->probs;
		b->pre_tok[i] = draw_row(b->item_req[i], b->logits + (size_t)b->pre_row[i] * b->V, probs, b->V);
	}
}

static void submit(ds_batcher *b, ds_req *r)
{
	r->next = b->reqs;
	b->reqs = r;
	ds_err e = { { 0 } };
	int rc = ds_sampler_new(&r->sp, b->V, &r->smp);
	if (!rc)
		rc = ds_spec_req_init(&r->spec, b->eng, NULL, r->smp, r->sp.temperature == 0, b->cfg.mtp_depth);
	r->spec.want = 0;
	r->draw_for = -1;
	if (!rc && b->tok)
		rc = ds_tok_stream_new(b->tok, r->skip_special ? DS_TOK_SKIP_SPECIAL : 0, &r->ts, &e);
	if (rc) {
		finish(b, r, DS_FINISH_ERROR, "out of memory");
		return;
	}
	ds_sampler_add_prompt(r->smp, r->tokens, r->n_prompt);
	r->sr.uid = (uint32_t)r->uid;
	r->sr.n_tokens = r->n_prompt;
	r->sr.user = r;
	rc = ds_sched_add(b->sched, &r->sr);
	if (rc) {
		finish(b, r, DS_FINISH_ERROR,
		       rc == -E2BIG ? "the prompt is longer than the model's context"
				    : rc == -ENOSPC ? "the prompt needs more KV blocks than the whole pool" : "cannot schedule");
		return;
	}
	r->in_sched = 1;
	pthread_mutex_lock(&b->st_mu);
	b->st.submitted++;
	b->st.prompt_tokens += (uint64_t)r->n_prompt;
	pthread_mutex_unlock(&b->st_mu);
}

/* ---- scheduler callbacks (the prefix cache extends admit/release) ---- */

static int ops_available(void *ctx)
{
	ds_batcher *b = ctx;
	return ds_kv_pool_free_count(ds_engine_pool(b->eng)) + ds_prefix_cached(b->pc);
}

static int ops_admit(void *ctx, ds_sched_req *sr)
{
	ds_batcher *b = ctx;
	ds_req *r = sr->user;
	if (!r->seq) {
		int rc = ds_seq_new(b->eng, &r->seq);
		if (rc)
			return rc;
	}
	/* positions already cached: the longest cached prefix (prompt, or
	 * prompt + generated after a preemption) */
	int hit = ds_prefix_adopt(b->pc, r->seq, r->tokens, sr->n_tokens);
	if (hit < 0) {
		r->seq = ds_seq_free(r->seq);
		return hit;
	}
	if (r->n_gen == 0)
		r->hit_tokens = hit < r->n_prompt ? hit : r->n_prompt;
	r->offered = 0;
	r->spec.n_draft = 0;
	return hit;
}

static void ops_release(void *ctx, ds_sched_req *sr)
{
	ds_req *r = sr->user;
	(void)ctx;
	r->seq = ds_seq_free(r->seq);
	r->spec.n_draft = 0; /* preempted: recomputed later, drafts forgotten */
}

/* ---- the step ---- */

static int grow(ds_batcher *b, int n, size_t rows, size_t hrows)
{
	if (n > b->items_cap) {
		ds_step_item *it = realloc(b->items, sizeof(*it) * (size_t)n);
		if (!it)
			return -ENOMEM;
		b->items = it;
#define GROW(p)                                                     \
	do {                                                        \
		void *q_ = realloc((void *)(p), sizeof(*(p)) * (size_t)n); \
		if (!q_)                                            \
			return -ENOMEM;                             \
		(p) = q_;                                           \
	} while (0)
		GROW(b->item_req);
		GROW(b->x_req);
		GROW(b->x_tok);
		GROW(b->x_hid);
		GROW(b->x_n);
		GROW(b->x_owner);
		GROW(b->pre_row);
		GROW(b->pre_tok);
#undef GROW
		b->items_cap = n;
	}
	if (rows > b->logits_rows) {
		float *l = realloc(b->logits, sizeof(float) * rows * (size_t)b->V);
		if (!l)
			return -ENOMEM;
		b->logits = l;
		int32_t *d = realloc(b->ids, sizeof(int32_t) * rows);
		if (!d)
			return -ENOMEM;
		b->ids = d;
		b->logits_rows = rows;
	}
	if (rows + (size_t)n * DS_SPEC_MAX_DEPTH > b->mids_cap) {
		int32_t *d = realloc(b->mids, sizeof(int32_t) * (rows + (size_t)n * DS_SPEC_MAX_DEPTH));
		if (!d)
			return -ENOMEM;
		b->mids = d;
		b->mids_cap = rows + (size_t)n * DS_SPEC_MAX_DEPTH;
	}
	if (hrows > b->hidden_rows) {
		float *h = realloc(b->hidden, sizeof(float) * hrows * (size_t)b->m->cfg.hidden_size);
		if (!h)
			return -ENOMEM;
		b->hidden = h;
		b->hidden_rows = hrows;
	}
	return 0;
}

/* Whether r's next token is drawn on the device; then r->draw holds the
 * request's settings and the uniform the host sampler would use for this
 * token (one per token, as ds_sampler_draw: the stream is the same either
 * way but at rounding boundaries, kernels/sample.h). The uniform is taken
 * once per token index, so a step retried after preemption reuses it. */
static int device_draw(ds_batcher *b, ds_req *r)
{
	const ds_sampling *p = &r->sp;
	if (!ds_engine_draws(b->eng) || p->temperature == 0 || r->logprobs || ds_sampling_penalized(p))
		return 0;
	if (r->draw_for != r->sr.n_tokens) {
		r->draw = (ds_draw){ .temperature = p->temperature, .top_p = p->top_p, .min_p = p->min_p,
				     .u = (float)ds_sampler_uniform(r->smp), .top_k = p->top_k };
		r->draw_for = r->sr.n_tokens;
	}
	return 1;
}

/* Drafts that will not be verified: forget them, and the MTP KV that
 * chained drafting wrote beyond the main KV. */
static void drop_drafts(ds_req *r)
{
	if (!r->spec.n_draft)
		return;
	r->spec.n_draft = 0;
	if (r->seq && ds_seq_mtp_len(r->seq) > ds_seq_len(r->seq))
		ds_seq_mtp_truncate(r->seq, ds_seq_len(r->seq));
}

/* Offers r's newly filled blocks to the prefix cache. With MTP on, a block
 * is complete only once the MTP layer's KV (in the same block) is written
 * too, so the offer stops at the MTP length. */
static void offer(ds_batcher *b, ds_req *r, int bt)
{
	if (!b->pc || !r->seq)
		return;
	/* a request that stopped inside a verified run holds KV for accepted
	 * drafts it never emitted: positions past its last token are not offered */
	int n = ds_seq_len(r->seq);
	if (n > r->sr.n_tokens - 1)
		n = r->sr.n_tokens - 1;
	if (r->spec.depth && ds_seq_mtp_len(r->seq) < n)
		n = ds_seq_mtp_len(r->seq);
	if (n / bt > r->offered) {
		ds_prefix_offer(b->pc, r->seq, r->tokens, n);
		r->offered = n / bt;
	}
}

/* A pure decode item: only the pending token is uncached. */
static int is_decode(const ds_req *r)
{
	return r->sr.n_sched == 1 && r->sr.n_cached + 1 == r->sr.n_tokens;
}

/* Greedy without penalties or logprobs: the step's argmax ids are all r needs. */
static int ids_only(const ds_req *r) { return ds_sampling_plain_greedy(&r->sp) && !r->logprobs; }

/* Verifying greedy requests without penalties or logprobs at the
 * configured depth draft in the same engine call (ds_engine_step_chain): no
 * host round trip between the main model and the MTP module. */
static int chains(const ds_batcher *b, const ds_req *r, int verify)
{
	return verify && b->chain && r->spec.n_draft > 0 && is_decode(r) && r->spec.depth == b->cfg.mtp_depth &&
	       r->mtp && ids_only(r) && ds_spec_chainable(&r->spec, b->m->cfg.max_position_embeddings);
}

/* Builds the step's items, chained ones first (b->n_chain of them); a
 * decoding sequence with drafts verifies them (its pending token and drafts,
 * logits for all) when `verify` allows. */
static int build_items(ds_batcher *b, const ds_sched_plan *plan, int verify, size_t *rows, size_t *hrows)
{
	int n = 0;
	*rows = *hrows = 0;
	b->n_chain = b->chain_rows = 0;
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < plan->n_items; i++) {
			ds_req *r = plan->items[i]->user;
			if (r->pend_head || r->finished || !r->seq)
				continue; /* paused: its client has not read yet */
			if (chains(b, r, verify) != !pass)
				continue;
			if (!pass) /* drafts chained through the host ran the MTP KV ahead */
				ds_seq_mtp_truncate(r->seq, ds_seq_len(r->seq));
			b->n_chain += !pass;
			b->chain_rows += !pass ? 1 + r->spec.n_draft : 0;
			ds_sched_req *s = &r->sr;
			if (verify && r->spec.n_draft > 0 && is_decode(r)) {
				r->vin[0] = r->tokens[s->n_cached];
				memcpy(r->vin + 1, r->spec.draft, sizeof(int32_t) * (size_t)r->spec.n_draft);
				/* plain greedy without logprobs checks the drafts by ids */
				b->items[n] = (ds_step_item){ .seq = r->seq, .tokens = r->vin, .n = 1 + r->spec.n_draft,
							      .logits = DS_LOGITS_ALL,
							      .argmax_only = ids_only(r) };
			} else {
				drop_drafts(r);
				/* Greedy without penalties or logprobs needs the argmax only,
				 * and a backend that draws takes sampling without penalties
				 * or logprobs: on a GPU the vocabulary row stays there. */
				b->items[n] = (ds_step_item){
					.seq = r->seq, .tokens = r->tokens + s->n_cached, .n = s->n_sched,
					.logits = s->n_cached + s->n_sched == s->n_tokens ? DS_LOGITS_LAST : DS_LOGITS_NONE,
					.argmax_only = ids_only(r),
				};
				if (b->items[n].logits == DS_LOGITS_LAST && !b->items[n].argmax_only && device_draw(b, r))
					b->items[n].draw = &r->draw;
			}
			*rows += b->items[n].logits == DS_LOGITS_ALL ? (size_t)b->items[n].n
				 : b->items[n].logits == DS_LOGITS_LAST ? 1 : 0;
			*hrows += (size_t)b->items[n].n;
			b->item_req[n++] = r;
		}
	return n;
}

/* After the main step: the MTP layer catches up with the main KV of every
 * live sequence (drafting where `want`), then the blocks it completed are
 * offered. On failure drafting stops for those sequences: their MTP KV no
 * longer matches the main KV. */
static void mtp_extend(ds_batcher *b, int k, int bt)
{
	if (!k)
		return;
	ds_err e = { { 0 } };
	int rc = ds_spec_extend(b->eng, &b->spec_ws, b->x_req, k, b->x_tok, b->x_n, b->x_hid, &e);
	for (int j = 0; j < k; j++) {
		ds_req *r = b->x_owner[j];
		if (rc) {
			r->spec.depth = 0;
			r->spec.n_draft = 0;
		}
		offer(b, r, bt);
	}
	if (rc)
		ds_log(DS_LOG_WARNING, "MTP step of %d sequences failed (%s); they go on without drafting", k,
		       e.msg[0] ? e.msg : strerror(-rc));
}

static int step(ds_batcher *b)
{
	const int bt = ds_kv_pool_block_tokens(ds_engine_pool(b->eng));
	ds_sched_plan plan;
	int rc = ds_sched_plan_step(b->sched, &plan);
	if (rc < 0) {
		ds_log(DS_LOG_ERR, "scheduler: %s", strerror(-rc));
		return 0;
	}
	int progress = plan.n_failed > 0;
	if (plan.n_preempted) {
		pthread_mutex_lock(&b->st_mu);
		b->st.preempted += (uint64_t)plan.n_preempted;
		pthread_mutex_unlock(&b->st_mu);
	}
	for (int i = 0; i < plan.n_failed; i++) {
		ds_req *r = plan.failed[i]->user;
		r->in_sched = 0; /* taken out by the scheduler */
		finish(b, r, DS_FINISH_ERROR,
		       plan.failed[i]->error == -E2BIG ? "the sequence outgrew the model's context"
		       : plan.failed[i]->error == -ENOSPC ? "the sequence needs more KV blocks than the whole pool"
							  : "could not start the sequence");
	}
	/* Drafting pays while the step is memory-bound: above mtp_max_batch
	 * sequences the extra verified tokens cost more than they save. */
	int n_dec = 0;
	for (int i = 0; i < plan.n_items; i++)
		n_dec += is_decode(plan.items[i]->user);
	const int mtp = b->cfg.mtp_depth > 0;
	int verify = mtp && n_dec <= b->cfg.mtp_max_batch;
	size_t rows, hrows;
	int n;
	ds_err e = { { 0 } };
	double t0 = ds_now(), dt;
	for (;;) {
		if (grow(b, plan.n_items, 0, 0)) /* items; logits and hidden below, sized exactly */
			return progress;
		n = build_items(b, &plan, verify, &rows, &hrows);
		if (!n)
			return progress;
		if (grow(b, n, rows, mtp ? hrows : 0))
			return progress;
		rc = rows ? ds_engine_step_chain(b->eng, b->items, n, b->n_chain, b->cfg.mtp_depth > 0 ? b->cfg.mtp_depth : 1,
						 b->logits, b->ids, b->mids, mtp ? b->hidden : NULL, &e)
			  : ds_engine_step(b->eng, b->items, n, b->logits, mtp ? b->hidden : NULL, &e);
		dt = ds_now() - t0;
		if (rc != -ENOSPC || !verify)
			break;
		verify = 0; /* the drafts' positions did not fit: try without them */
	}
	if (rc == -ENOSPC) {
		if (ds_sched_preempt_one(b->sched) == 0) {
			pthread_mutex_lock(&b->st_mu);
			b->st.preempted++;
			pthread_mutex_unlock(&b->st_mu);
		}
		return 1;
	}
	if (rc) {
		ds_log(DS_LOG_ERR, "engine step of %d sequences failed: %s", n, e.msg[0] ? e.msg : strerror(-rc));
		for (int i = 0; i < n; i++)
			finish(b, b->item_req[i], DS_FINISH_ERROR, e.msg[0] ? e.msg : "engine step failed");
		return 1;
	}
	const int H = b->m->cfg.hidden_size;
	const int want = n <= b->cfg.mtp_max_batch; /* draft for the next step */
	int row = 0, hoff = 0, k = 0;
	presample(b, n);
	b->stepping = 1;
	for (int i = 0; i < n; i++) {
		ds_req *r = b->item_req[i];
		const ds_step_item *it = &b->items[i];
		const int kb = ds_seq_len(r->seq) - it->n; /* cached positions before the step */
		const int dec = is_decode(r);
		if (it->tokens == r->vin) {
			const int nd = r->spec.n_draft;
			r->spec.seq = r->seq;
			if (i < b->n_chain) /* chained items draft in verification */
				r->spec.want = r->mtp && want;
			if (i < b->n_chain ? ds_spec_verify_chained(&r->spec, b->ids + row, b->mids + row,
								     b->mids + b->chain_rows + i, b->n_chain,
								     b->m->cfg.max_position_embeddings)
			    : it->argmax_only ? ds_spec_verify_ids(&r->spec, b->ids + row)
					      : ds_spec_verify(&r->spec, b->logits + (size_t)row * b->V, b->V, b->probs)) {
				finish(b, r, DS_FINISH_ERROR, "cannot roll back rejected drafts");
				row += it->n;
				hoff += it->n;
				continue;
			}
			r->drafted += (uint32_t)nd;
			r->accepted += (uint32_t)(r->spec.n_out - 1);
			b->mtp_drafted += (uint64_t)nd;
			b->mtp_accepted += (uint64_t)(r->spec.n_out - 1);
			r->sr.n_cached += r->spec.n_out; /* the pending token and the accepted drafts */
			offer(b, r, bt);
			int emitted = 0;
			for (int j = 0; j < r->spec.n_out && !r->finished; j++, emitted++)
				token_out(b, r, b->logits + (size_t)(row + j) * b->V, r->spec.out[j]);
			b->decode_steps++;
			b->decode_tokens += (uint64_t)emitted;
			row += it->n;
		} else {
			r->sr.n_cached += it->n;
			offer(b, r, bt);
			if (it->logits == DS_LOGITS_LAST) {
				if (r->t_prefill_done == 0)
					r->t_prefill_done = ds_now();
				if (it->argmax_only || it->draw) {
					ds_sampler_accept(r->smp, b->ids[row]);
					on_token(b, r, b->ids[row], NAN, NULL, 0);
				} else {
					token_out(b, r, b->logits + (size_t)row * b->V, b->pre_tok[i]);
				}
				row++;
				if (dec) {
					b->decode_steps++;
					b->decode_tokens++;
				}
			}
		}
		if (mtp && r->spec.depth && r->seq) {
			const int ml = ds_seq_mtp_len(r->seq);
			int kl = ds_seq_len(r->seq);
			if (kl > r->sr.n_tokens - 1)
				kl = r->sr.n_tokens - 1; /* stopped inside a verified run */
			if (ml < kb) {
				r->spec.depth = 0; /* cannot happen while every step extends the MTP KV */
				ds_log(DS_LOG_WARNING, "request %llu: MTP KV behind the main KV; drafting off",
				       (unsigned long long)r->id);
			} else if (kl > ml) {
				r->spec.seq = r->seq;
				r->spec.want = r->mtp && want && !r->finished && kl + 1 == r->sr.n_tokens;
				b->x_req[k] = &r->spec;
				b->x_tok[k] = r->tokens + ml + 1;
				b->x_n[k] = kl - ml;
				b->x_hid[k] = b->hidden + (size_t)(hoff + ml - kb) * H;
				b->x_owner[k++] = r;
			}
		}
		hoff += it->n;
	}
	mtp_extend(b, k, bt);
	b->stepping = 0;
	for (int i = 0; i < n; i++) {
		ds_req *r = b->item_req[i];
		if (!r->finished)
			continue;
		leave_engine(b, r);
		if (!r->pend_head)
			retire(b, r);
	}
	pthread_mutex_lock(&b->st_mu);
	b->st.steps++;
	b->st.last_step_ms = dt * 1e3;
	pthread_mutex_unlock(&b->st_mu);
	return 1;
}

static int flush_pending(ds_batcher *b)
{
	int progress = 0;
	for (ds_req *r = b->reqs, *nx; r; r = nx) {
		nx = r->next;
		while (r->pend_head) {
			ds_pend *p = r->pend_head;
			if (deliver(b, r, &p->ev) == -EAGAIN)
				break;
			r->pend_head = p->next;
			if (!r->pend_head)
				r->pend_tail = NULL;
			free(p);
			progress = 1;
		}
		if (r->finished && !r->pend_head)
			retire(b, r);
	}
	return progress;
}

static void publish_rings(ds_batcher *b)
{
	for (ds_req *r = b->reqs; r; r = r->next)
		if (r->use_ring && !atomic_load(&r->conn->gone))
			ds_ring_publish(r->conn->ring);
}

/* A retired request's final record is in its ring but not yet published:
 * the DONE messages of this iteration name those connections. */
static void publish_conn(ds_conn *c)
{
	if (c && c->ring && !atomic_load(&c->gone))
		ds_ring_publish(c->ring);
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return x < y ? -1 : x > y;
}

static void percentiles(const samples *s, double *p50, double *p99)
{
	size_t n = s->n < NSAMPLES ? s->n : NSAMPLES;
	if (!n) {
		*p50 = *p99 = 0;
		return;
	}
	float tmp[NSAMPLES];
	memcpy(tmp, s->v, sizeof(float) * n);
	qsort(tmp, n, sizeof(float), cmp_float);
	*p50 = tmp[(n - 1) * 50 / 100];
	*p99 = tmp[(n - 1) * 99 / 100];
}

/* Per MoE layer: the busiest expert's share against an even spread. */
static void expert_stats(ds_batcher *b, ds_batcher_stats *st)
{
	const int E = b->m->cfg.n_routed_experts, NL = b->m->n_layers + b->m->n_mtp;
	if (ds_engine_expert_load(b->eng, b->eload))
		return;
	int n = 0;
	uint64_t all = 0;
	for (int l = 0; l < NL && n < DS_STATS_MAX_LAYERS; l++) {
		const uint64_t *c = b->eload + (size_t)l * E;
		uint64_t sum = 0;
		int hot = 0;
		for (int x = 0; x < E; x++) {
			sum += c[x];
			if (c[x] > c[hot])
				hot = x;
		}
		if (!b->m->layers[l].is_moe)
			continue;
		all += sum;
		st->expert_layer_id[n] = l;
		st->expert_hottest[n] = hot;
		st->expert_max_over_mean[n++] = sum ? (double)c[hot] * E / (double)sum : 0;
	}
	st->expert_layers = n;
	st->expert_routed = all;
}

static void publish_stats(ds_batcher *b)
{
	double now = ds_now();
	int running = 0, waiting = 0, paused = 0, live = 0;
	for (ds_req *r = b->reqs; r; r = r->next) {
		live++;
		if (r->pend_head)
			paused++;
		else if (r->sr.state == DS_SCHED_RUNNING)
			running++;
		else if (r->sr.state == DS_SCHED_WAITING)
			waiting++;
	}
	ds_ps_entry *ps = live ? malloc(sizeof(*ps) * (size_t)live) : NULL;
	int n = 0;
	for (ds_req *r = b->reqs; r && ps; r = r->next)
		ps[n++] = (ds_ps_entry){ .id = r->id, .uid = r->uid, .pid = r->pid,
					 .state = r->pend_head ? 3 : r->sr.state, .prompt_tokens = r->n_prompt,
					 .generated = r->n_gen, .cached = r->sr.n_cached, .age_s = now - r->t_arrive };
	ds_kv_pool *pool = ds_engine_pool(b->eng);
	pthread_mutex_lock(&b->st_mu);
	b->st.generated_tokens = b->gen_total;
	uint64_t gen = b->gen_total;
	if (now - b->tps_t[b->tps_i] >= 1.0) {
		b->tps_i = (b->tps_i + 1) % 11;
		b->tps_t[b->tps_i] = now;
		b->tps_g[b->tps_i] = gen;
	}
	b->st.running = running;
	b->st.waiting = waiting;
	b->st.paused = paused;
	b->st.live = live;
	b->st.kv_blocks_total = ds_kv_pool_blocks(pool);
	b->st.kv_blocks_free = ds_kv_pool_free_count(pool);
	b->st.kv_blocks_cached = ds_prefix_cached(b->pc);
	if (b->pc) {
		ds_prefix_stats ps_;
		ds_prefix_stats_get(b->pc, &ps_);
		b->st.prefix_prompt_tokens = ps_.prompt_tokens;
		b->st.prefix_hit_tokens = ps_.hit_tokens;
		b->st.prefix_evictions = ps_.evictions;
	}
	b->st.block_tokens = ds_kv_pool_block_tokens(pool);
	b->st.mtp_drafted = b->mtp_drafted;
	b->st.mtp_accepted = b->mtp_accepted;
	b->st.decode_steps = b->decode_steps;
	b->st.decode_tokens = b->decode_tokens;
	b->st.mtp_depth = b->cfg.mtp_depth;
	b->st.mtp_max_batch = b->cfg.mtp_max_batch;
	if (b->eload && (now - b->eload_t >= 1.0 || !running)) { /* idle: final counts */
		b->eload_t = now;
		expert_stats(b, &b->st);
	}
	if (b->samples_dirty) {
		percentiles(&b->ttft, &b->st.ttft_p50_ms, &b->st.ttft_p99_ms);
		percentiles(&b->tpot, &b->st.tpot_p50_ms, &b->st.tpot_p99_ms);
		b->samples_dirty = 0;
	}
	free(b->ps);
	b->ps = ps;
	b->n_ps = ps ? n : 0;
	pthread_mutex_unlock(&b->st_mu);
}

static void watchdog(ds_batcher *b)
{
	if (!b->wd_usec)
		return;
	double now = ds_now();
	if (now - b->wd_last >= b->wd_usec / 2e6) {
		sd_notify(0, "WATCHDOG=1");
		b->wd_last = now;
	}
}

static void run_cmds(ds_batcher *b, cmd *c)
{
	/* the inbox is a stack: reverse it into arrival order */
	cmd *rev = NULL;
	while (c) {
		cmd *nx = c->next;
		c->next = rev;
		rev = c;
		c = nx;
	}
	for (c = rev; c; c = rev) {
		rev = c->next;
		switch (c->kind) {
		case CMD_SUBMIT:
			submit(b, c->r);
			break;
		case CMD_CANCEL:
			for (ds_req *r = b->reqs; r; r = r->next)
				if (r->id == c->id && !r->finished) {
					finish(b, r, DS_FINISH_CANCELLED, NULL);
					break;
				}
			break;
		case CMD_CANCEL_ALL:
			for (ds_req *r = b->reqs, *nx; r; r = nx) {
				nx = r->next;
				if (!r->finished)
					finish(b, r, DS_FINISH_CANCELLED, NULL);
			}
			break;
		case CMD_FLUSH:
			ds_prefix_flush(b->pc);
			break;
		case CMD_GONE:
			for (ds_req *r = b->reqs, *nx; r; r = nx) {
				nx = r->next;
				if (r->conn == c->c)
					drop(b, r);
			}
			ds_conn_unref(c->c);
			break;
		}
		free(c);
	}
}

static void *run(void *arg)
{
	ds_batcher *b = arg;
	int busy = 0;
	for (;;) {
		pthread_mutex_lock(&b->mu);
		while (!b->inbox && !b->poked && !b->quit && !busy) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			pthread_cond_timedwait(&b->cv, &b->mu, &ts);
			watchdog(b);
		}
		cmd *c = b->inbox;
		b->inbox = NULL;
		b->poked = 0;
		int quit = b->quit;
		pthread_mutex_unlock(&b->mu);
		run_cmds(b, c);
		if (quit) {
			for (ds_req *r = b->reqs, *nx; r; r = nx) {
				nx = r->next;
				drop(b, r);
			}
		}
		busy = flush_pending(b);
		busy |= step(b);
		publish_rings(b);
		/* finals of retired requests: their rings are in the DONE messages */
		for (ds_out_msg *m = b->loc_head; m; m = m->next)
			if (m->kind == DS_OUT_DONE)
				publish_conn(m->conn);
		out_flush(b);
		publish_stats(b);
		watchdog(b);
		if (quit)
			break;
	}
	return NULL;
}

/* ---- the loop thread's side ---- */

int ds_batcher_new(int out_efd, ds_batcher **out)
{
	ds_batcher *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->out_efd = out_efd;
	pthread_mutex_init(&b->mu, NULL);
	pthread_cond_init(&b->cv, NULL);
	pthread_mutex_init(&b->out_mu, NULL);
	pthread_mutex_init(&b->st_mu, NULL);
	*out = b;
	return 0;
}

int ds_batcher_start(ds_batcher *b, ds_engine *eng, const ds_tok *tok, const ds_batcher_cfg *c, ds_err *e)
{
	b->eng = eng;
	b->m = ds_engine_model(eng);
	b->tok = tok;
	b->cfg = *c;
	b->V = b->m->cfg.vocab_size;
	/* no MTP layer, or never drafting: plain decoding, and no MTP KV to keep */
	if (b->m->n_mtp == 0 || b->cfg.mtp_depth < 0 || b->cfg.mtp_max_batch <= 0)
		b->cfg.mtp_depth = 0;
	if (b->cfg.mtp_depth > DS_SPEC_MAX_DEPTH)
		b->cfg.mtp_depth = DS_SPEC_MAX_DEPTH;
	b->chain = b->cfg.mtp_chain < 0 ? ds_engine_chains(eng) : b->cfg.mtp_chain > 0;
	b->max_ctx = b->m->cfg.max_position_embeddings;
	ds_kv_pool *pool = ds_engine_pool(eng);
	ds_sched_config sc = {
		.block_tokens = ds_kv_pool_block_tokens(pool), .pool_blocks = ds_kv_pool_blocks(pool),
		.max_context = b->max_ctx, .step_tokens = c->step_tokens, .max_running = c->max_batch,
		.uid_max_running = c->uid_max_running,
	};
	if (sc.step_tokens < sc.max_running)
		sc.step_tokens = sc.max_running;
	ds_sched_ops ops = { .ctx = b, .available = ops_available, .admit = ops_admit, .release = ops_release };
	int rc = ds_sched_new(&sc, &ops, &b->sched);
	if (!rc && c->prefix_cache)
		rc = ds_prefix_new(pool, &b->pc);
	if (!rc) {
		b->probs = malloc(sizeof(float) * (size_t)b->V);
		rc = b->probs ? 0 : -ENOMEM;
	}
	if (rc) {
		b->sched = ds_sched_free(b->sched);
		b->pc = ds_prefix_free(b->pc);
		free(b->probs);
		b->probs = NULL;
		return ds_errf(e, rc, "scheduler: %s", strerror(-rc));
	}
	for (int i = 0; i < 11; i++)
		b->tps_t[i] = ds_now();
	if (b->m->cfg.n_routed_experts > 0) {
		b->eload = calloc((size_t)(b->m->n_layers + b->m->n_mtp) * b->m->cfg.n_routed_experts, sizeof(uint64_t));
		b->eload_t = -1e9;
	}
	uint64_t usec = 0;
	if (sd_watchdog_enabled(0, &usec) > 0)
		b->wd_usec = usec;
	publish_stats(b);
	rc = pthread_create(&b->th, NULL, run, b);
	if (rc) {
		b->sched = ds_sched_free(b->sched);
		b->pc = ds_prefix_free(b->pc);
		free(b->probs);
		b->probs = NULL;
		return ds_errf(e, -rc, "cannot start the engine thread: %s", strerror(rc));
	}
	b->started = 1;
	return 0;
}

static void post(ds_batcher *b, int kind, ds_req *r, uint64_t id, ds_conn *c)
{
	cmd *m = calloc(1, sizeof(*m));
	if (!m) {
		ds_log(DS_LOG_ERR, "out of memory posting to the engine thread");
		return;
	}
	m->kind = kind;
	m->r = r;
	m->id = id;
	m->c = c;
	pthread_mutex_lock(&b->mu);
	m->next = b->inbox;
	b->inbox = m;
	pthread_cond_signal(&b->cv);
	pthread_mutex_unlock(&b->mu);
}

void ds_batcher_submit(ds_batcher *b, ds_req *r)
{
	post(b, CMD_SUBMIT, r, r->id, NULL);
}

void ds_batcher_cancel(ds_batcher *b, uint64_t id)
{
	post(b, CMD_CANCEL, NULL, id, NULL);
}

void ds_batcher_cancel_all(ds_batcher *b)
{
	post(b, CMD_CANCEL_ALL, NULL, 0, NULL);
}

void ds_batcher_conn_gone(ds_batcher *b, ds_conn *c)
{
	post(b, CMD_GONE, NULL, 0, ds_conn_ref(c));
}

void ds_batcher_cache_flush(ds_batcher *b)
{
	post(b, CMD_FLUSH, NULL, 0, NULL);
}

void ds_batcher_poke(ds_batcher *b)
{
	pthread_mutex_lock(&b->mu);
	b->poked = 1;
	pthread_cond_signal(&b->cv);
	pthread_mutex_unlock(&b->mu);
}

ds_batcher *ds_batcher_stop(ds_batcher *b)
{
	if (!b)
		return NULL;
	if (b->started) {
		pthread_mutex_lock(&b->mu);
		b->quit = 1;
		pthread_cond_signal(&b->cv);
		pthread_mutex_unlock(&b->mu);
		pthread_join(b->th, NULL);
	}
	for (cmd *c = b->inbox, *nx; c; c = nx) {
		nx = c->next;
		if (c->kind == CMD_SUBMIT)
			ds_req_free(c->r);
		if (c->kind == CMD_GONE)
			ds_conn_unref(c->c);
		free(c);
	}
	for (ds_out_msg *m = ds_batcher_take(b), *nx; m; m = nx) {
		nx = m->next;
		ds_out_msg_free(m);
	}
	ds_sched_free(b->sched);
	/* the thread is gone; sequences freed later go straight to the free list */
	b->pc = ds_prefix_free(b->pc);
	free(b->items);
	free(b->item_req);
	free(b->x_req);
	free(b->x_tok);
	free(b->x_hid);
	free(b->x_n);
	free(b->x_owner);
	b->spec_ws = ds_spec_ws_free(b->spec_ws);
	free(b->hidden);
	free(b->eload);
	free(b->logits);
	free(b->ids);
	free(b->mids);
	free(b->probs);
	free(b->tprobs);
	free(b->pre_row);
	free(b->pre_tok);
	free(b->ps);
	pthread_mutex_destroy(&b->mu);
	pthread_cond_destroy(&b->cv);
	pthread_mutex_destroy(&b->out_mu);
	pthread_mutex_destroy(&b->st_mu);
	free(b);
	return NULL;
}

void ds_batcher_stats_get(ds_batcher *b, ds_batcher_stats *st)
{
	pthread_mutex_lock(&b->st_mu);
	*st = b->st;
	/* over the last ~10 s, from the oldest per-second mark to now: an idle
	 * engine (which publishes nothing) decays to 0 */
	int old = (b->tps_i + 1) % 11;
	double span = ds_now() - b->tps_t[old];
	st->tokens_per_s = span > 0.5 ? (double)(st->generated_tokens - b->tps_g[old]) / span : 0;
	pthread_mutex_unlock(&b->st_mu);
}

int ds_batcher_ps(ds_batcher *b, ds_ps_entry **out, int *n)
{
	pthread_mutex_lock(&b->st_mu);
	*n = b->n_ps;
	*out = NULL;
	if (b->n_ps) {
		*out = malloc(sizeof(ds_ps_entry) * (size_t)b->n_ps);
		if (*out)
			memcpy(*out, b->ps, sizeof(ds_ps_entry) * (size_t)b->n_ps);
		else
			*n = 0;
	}
	pthread_mutex_unlock(&b->st_mu);
	return *out || !*n ? 0 : -ENOMEM;
}
