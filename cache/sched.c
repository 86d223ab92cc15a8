#include "cache/sched.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* One entry per client with queued or running requests, in the order they
 * first appeared: the round-robin ring. */
typedef struct uid_ent {
	uint32_t uid;
	int running, waiting;
	ds_sched_req *head, *tail; /* waiting, best rank first */
} uid_ent;

struct ds_sched {
	ds_sched_config cfg;
	ds_sched_ops ops;
	uid_ent *uids;
	int n_uids, cap_uids;
	int cursor; /* ring index of the client admitted last, -1 none */
	ds_sched_req **run;
	int n_run;
	int n_total, cap_total; /* requests known; sizes run/items/failed */
	ds_sched_req **items, **failed;
	uint64_t arrival;
	uint64_t admitted, preempted, steps;
};

static int blocks_for(const ds_sched *s, int n)
{
	return (n + s->cfg.block_tokens - 1) / s->cfg.block_tokens;
}

/* New blocks r needs to feed k more tokens. */
static int new_blocks(const ds_sched *s, const ds_sched_req *r, int k)
{
	return blocks_for(s, r->n_cached + k) - blocks_for(s, r->n_cached);
}

/* Better rank: higher priority, then earlier arrival. */
static int rank_before(const ds_sched_req *a, const ds_sched_req *b)
{
	return a->priority > b->priority || (a->priority == b->priority && a->arrival < b->arrival);
}

static int uid_find(const ds_sched *s, uint32_t uid)
{
	for (int i = 0; i < s->n_uids; i++)
		if (s->uids[i].uid == uid)
			return i;
	return -1;
}

static int uid_get(ds_sched *s, uint32_t uid)
{
	int i = uid_find(s, uid);
	if (i >= 0)
		return i;
	if (s->n_uids == s->cap_uids) {
		int cap = s->cap_uids ? s->cap_uids * 2 : 8;
		uid_ent *u = realloc(s->uids, sizeof(*u) * (size_t)cap);
		if (!u)
			return -ENOMEM;
		s->uids = u;
		s->cap_uids = cap;
	}
	s->uids[s->n_uids] = (uid_ent){ .uid = uid };
	return s->n_uids++;
}

static void uid_drop_if_empty(ds_sched *s, int i)
{
	if (s->uids[i].running || s->uids[i].waiting)
		return;
	memmove(&s->uids[i], &s->uids[i + 1], sizeof(uid_ent) * (size_t)(s->n_uids - i - 1));
	s->n_uids--;
	if (s->cursor >= i)
		s->cursor--;
}

static void wait_insert(ds_sched *s, ds_sched_req *r)
{
	uid_ent *u = &s->uids[uid_find(s, r->uid)];
	ds_sched_req *after = u->tail;
	while (after && rank_before(r, after))
		after = after->prev;
	r->prev = after;
	r->next = after ? after->next : u->head;
	if (r->next)
		r->next->prev = r;
	else
		u->tail = r;
	if (after)
		after->next = r;
	else
		u->head = r;
	u->waiting++;
	r->state = DS_SCHED_WAITING;
}

static void wait_unlink(ds_sched *s, ds_sched_req *r)
{
	uid_ent *u = &s->uids[uid_find(s, r->uid)];
	if (r->prev)
		r->prev->next = r->next;
	else
		u->head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		u->tail = r->prev;
	r->prev = r->next = NULL;
	u->waiting--;
}

static void run_add(ds_sched *s, ds_sched_req *r)
{
	s->run[s->n_run++] = r;
	s->uids[uid_find(s, r->uid)].running++;
	r->state = DS_SCHED_RUNNING;
}

static void run_del(ds_sched *s, ds_sched_req *r)
{
	for (int i = 0; i < s->n_run; i++)
		if (s->run[i] == r) {
			memmove(&s->run[i], &s->run[i + 1], sizeof(*s->run) * (size_t)(s->n_run - i - 1));
			s->n_run--;
			break;
		}
	s->uids[uid_find(s, r->uid)].running--;
}

/* Takes r out entirely (state IDLE); drops its client when it was the last. */
static void forget(ds_sched *s, ds_sched_req *r)
{
	if (r->state == DS_SCHED_WAITING)
		wait_unlink(s, r);
	else if (r->state == DS_SCHED_RUNNING)
		run_del(s, r);
	else
		return;
	r->state = DS_SCHED_IDLE;
	r->n_sched = 0;
	s->n_total--;
	uid_drop_if_empty(s, uid_find(s, r->uid));
}

static void fail(ds_sched *s, ds_sched_plan *p, ds_sched_req *r, int err)
{
	if (r->state == DS_SCHED_RUNNING)
		s->ops.release(s->ops.ctx, r);
	forget(s, r);
	r->error = err;
	p->failed[p->n_failed++] = r;
}

/* Lowest priority; then the client with the most running sequences (so a
 * client with few is hit last); then the latest arrival. */
static ds_sched_req *victim(const ds_sched *s)
{
	ds_sched_req *v = NULL;
	int v_run = 0;
	for (int i = 0; i < s->n_run; i++) {
		ds_sched_req *r = s->run[i];
		int r_run = s->uids[uid_find(s, r->uid)].running;
		if (!v || r->priority < v->priority ||
		    (r->priority == v->priority && (r_run > v_run || (r_run == v_run && r->arrival > v->arrival)))) {
			v = r;
			v_run = r_run;
		}
	}
	return v;
}

static void preempt(ds_sched *s, ds_sched_req *r)
{
	s->ops.release(s->ops.ctx, r);
	run_del(s, r);
	r->n_cached = 0;
	r->n_sched = 0;
	r->n_preempted++;
	s->preempted++;
	wait_insert(s, r);
}

static void sort_running(ds_sched *s)
{
	for (int i = 1; i < s->n_run; i++) {
		ds_sched_req *r = s->run[i];
		int j = i;
		for (; j > 0 && rank_before(r, s->run[j - 1]); j--)
			s->run[j] = s->run[j - 1];
		s->run[j] = r;
	}
}

/* The next client after the cursor with a waiting request and room under
 * its limit, or -1. */
static int rr_next(const ds_sched *s)
{
	for (int k = 1; k <= s->n_uids; k++) {
		int i = (s->cursor + k) % s->n_uids;
		if (i < 0)
			i += s->n_uids;
		const uid_ent *u = &s->uids[i];
		if (u->waiting && (!s->cfg.uid_max_running || u->running < s->cfg.uid_max_running))
			return i;
	}
	return -1;
}

int ds_sched_new(const ds_sched_config *c, const ds_sched_ops *ops, ds_sched **out)
{
	if (!c || !ops || !ops->available || !ops->admit || !ops->release || !out)
		return -EINVAL;
	if (c->block_tokens < 1 || c->pool_blocks < 1 || c->max_context < 1 || c->max_running < 1 ||
	    c->step_tokens < c->max_running || c->uid_max_running < 0)
		return -EINVAL;
	ds_sched *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->cfg = *c;
	s->ops = *ops;
	s->cursor = -1;
	*out = s;
	return 0;
}

ds_sched *ds_sched_free(ds_sched *s)
{
	if (s) {
		free(s->uids);
		free(s->run);
		free(s->items);
		free(s->failed);
		free(s);
	}
	return NULL;
}

static int reserve(ds_sched *s, int n)
{
	if (n <= s->cap_total)
		return 0;
	int cap = s->cap_total ? s->cap_total * 2 : 16;
	while (cap < n)
		cap *= 2;
	ds_sched_req **a = realloc(s->run, sizeof(*a) * (size_t)cap);
	if (a)
		s->run = a;
	ds_sched_req **b = realloc(s->items, sizeof(*b) * (size_t)cap);
	if (b)
		s->items = b;
	ds_sched_req **d = realloc(s->failed, sizeof(*d) * (size_t)cap);
	if (d)
		s->failed = d;
	if (!a || !b || !d)
		return -ENOMEM;
	s->cap_total = cap;
	return 0;
}

int ds_sched_add(ds_sched *s, ds_sched_req *r)
{
	if (!s || !r || r->n_tokens < 1 || r->state != DS_SCHED_IDLE)
		return -EINVAL;
	if (r->n_tokens > s->cfg.max_context)
		return -E2BIG;
	if (blocks_for(s, r->n_tokens) > s->cfg.pool_blocks)
		return -ENOSPC;
	int rc = reserve(s, s->n_total + 1);
	if (rc)
		return rc;
	if ((rc = uid_get(s, r->uid)) < 0)
		return rc;
	r->arrival = s->arrival++;
	r->n_cached = 0;
	r->n_sched = 0;
	r->error = 0;
	r->prev = r->next = NULL;
	s->n_total++;
	wait_insert(s, r);
	return 0;
}

void ds_sched_remove(ds_sched *s, ds_sched_req *r)
{
	if (s && r)
		forget(s, r);
}

int ds_sched_preempt_one(ds_sched *s)
{
	ds_sched_req *v = s ? victim(s) : NULL;
	if (!v)
		return -ENOENT;
	preempt(s, v);
	return 0;
}

static void schedule(ds_sched_plan *p, ds_sched_req *r, int n)
{
	r->n_sched = n;
	p->items[p->n_items++] = r;
	p->tokens += n;
}

int ds_sched_plan_step(ds_sched *s, ds_sched_plan *p)
{
	if (!s || !p)
		return -EINVAL;
	memset(p, 0, sizeof(*p));
	p->items = s->items;
	p->failed = s->failed;
	s->steps++;
	for (;;) {
		p->n_items = 0;
		p->tokens = 0;
		for (int i = 0; i < s->n_run; i++)
			s->run[i]->n_sched = 0;
		sort_running(s);
		for (int i = 0; i < s->n_run; i++) {
			ds_sched_req *r = s->run[i];
			int bad = r->n_tokens > s->cfg.max_context ? -E2BIG : r->n_cached >= r->n_tokens ? -EINVAL : 0;
			if (bad) {
				fail(s, p, r, bad);
				i--;
			}
		}
		/* Decodes (one token left to feed) first; when their blocks do not
		 * fit, preempt until they do. Alone and still short: the sequence
		 * outgrew the pool. */
		int avail;
		for (;;) {
			int need = 0;
			for (int i = 0; i < s->n_run; i++)
				if (s->run[i]->n_tokens - s->run[i]->n_cached == 1)
					need += new_blocks(s, s->run[i], 1);
			avail = s->ops.available(s->ops.ctx);
			if (need <= avail)
				break;
			if (s->n_run == 1) {
				fail(s, p, s->run[0], -ENOSPC);
			} else {
				preempt(s, victim(s));
				p->n_preempted++;
			}
		}
		sort_running(s);
		int budget = s->cfg.step_tokens, planned = 0;
		for (int i = 0; i < s->n_run && budget > 0; i++) {
			ds_sched_req *r = s->run[i];
			if (r->n_tokens - r->n_cached != 1)
				continue;
			schedule(p, r, 1);
			planned += new_blocks(s, r, 1);
			budget--;
		}
		/* Prefill chunks of admitted prompts, best rank first, shrunk to the
		 * blocks left. */
		int reserved = 0;
		for (int i = 0; i < s->n_run; i++) {
			ds_sched_req *r = s->run[i];
			int rem = r->n_tokens - r->n_cached;
			if (rem <= 1)
				continue;
			int chunk = rem < budget ? rem : budget;
			int fit = (blocks_for(s, r->n_cached) + avail - planned) * s->cfg.block_tokens - r->n_cached;
			if (chunk > fit)
				chunk = fit;
			if (chunk > 0) {
				schedule(p, r, chunk);
				planned += new_blocks(s, r, chunk);
				budget -= chunk;
			}
			reserved += blocks_for(s, r->n_tokens) - blocks_for(s, r->n_cached + r->n_sched);
		}
		/* Admission, one client at a time round the ring. A prompt is admitted
		 * when all its blocks fit beside what running prompts still need; when
		 * the next in turn does not fit, nobody overtakes it. */
		while (budget > 0 && s->n_run < s->cfg.max_running) {
			int ui = rr_next(s);
			if (ui < 0)
				break;
			ds_sched_req *r = s->uids[ui].head;
			if (blocks_for(s, r->n_tokens) > s->cfg.pool_blocks || r->n_tokens > s->cfg.max_context) {
				fail(s, p, r, r->n_tokens > s->cfg.max_context ? -E2BIG : -ENOSPC);
				continue;
			}
			int hit = s->ops.admit(s->ops.ctx, r);
			r->n_admits++;
			wait_unlink(s, r);
			if (hit < 0 || hit >= r->n_tokens) {
				if (hit >= 0)
					s->ops.release(s->ops.ctx, r);
				r->state = DS_SCHED_IDLE;
				s->n_total--;
				uid_drop_if_empty(s, ui);
				r->error = hit < 0 ? hit : -EINVAL;
				p->failed[p->n_failed++] = r;
				continue;
			}
			run_add(s, r);
			r->n_cached = hit;
			int total = blocks_for(s, r->n_tokens) - blocks_for(s, hit);
			if (total > s->ops.available(s->ops.ctx) - planned - reserved) {
				s->ops.release(s->ops.ctx, r);
				run_del(s, r);
				r->n_cached = 0;
				wait_insert(s, r);
				break;
			}
			int rem = r->n_tokens - hit;
			int chunk = rem < budget ? rem : budget;
			schedule(p, r, chunk);
			planned += new_blocks(s, r, chunk);
			reserved += total - new_blocks(s, r, chunk);
			budget -= chunk;
			s->cursor = ui;
			s->admitted++;
			p->n_admitted++;
		}
		if (p->n_items > 0 || s->n_run == 0)
			break;
		/* Running prompts hold blocks and none can take another: free one. */
		if (s->n_run == 1) {
			fail(s, p, s->run[0], -ENOSPC);
		} else {
			preempt(s, victim(s));
			p->n_preempted++;
		}
	}
	return p->n_items;
}

void ds_sched_stats_get(const ds_sched *s, ds_sched_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (!s)
		return;
	st->running = s->n_run;
	st->waiting = s->n_total - s->n_run;
	st->clients = s->n_uids;
	st->admitted = s->admitted;
	st->preempted = s->preempted;
	st->steps = s->steps;
}
