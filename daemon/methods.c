/* methods.c — the RPC methods of docs/PROTOCOL.md: each checks its params
 * (types, ranges, UTF-8, limits) and answers with a result or [code, msg]. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/log.h"
#include "daemon/serve.h"
#include "model/chat_template.h"

#ifndef DS_VERSION
#define DS_VERSION "0.1"
#endif

typedef struct pk {
	msgpack_sbuffer sb;
	msgpack_packer p;
} pk;

static void pk_init(pk *k)
{
	msgpack_sbuffer_init(&k->sb);
	msgpack_packer_init(&k->p, &k->sb, msgpack_sbuffer_write);
}

static void kv_str(msgpack_packer *p, const char *k, const char *v)
{
	ds_mp_pack_str(p, k);
	ds_mp_pack_str(p, v);
}

static void kv_i64(msgpack_packer *p, const char *k, int64_t v)
{
	ds_mp_pack_str(p, k);
	msgpack_pack_int64(p, v);
}

static void kv_u64(msgpack_packer *p, const char *k, uint64_t v)
{
	ds_mp_pack_str(p, k);
	msgpack_pack_uint64(p, v);
}

static void kv_f64(msgpack_packer *p, const char *k, double v)
{
	ds_mp_pack_str(p, k);
	msgpack_pack_double(p, v);
}

/* Checks that every key of map is one of allowed (NULL-terminated). */
static const char *unknown_key(const msgpack_object *map, const char *const *allowed)
{
	static char bad[64];
	if (!map || map->type != MSGPACK_OBJECT_MAP)
		return NULL;
	for (uint32_t i = 0; i < map->via.map.size; i++) {
		const msgpack_object *k = &map->via.map.ptr[i].key;
		if (k->type != MSGPACK_OBJECT_STR)
			return "(a key that is not a string)";
		int ok = 0;
		for (const char *const *a = allowed; *a && !ok; a++)
			ok = strlen(*a) == k->via.str.size && !memcmp(*a, k->via.str.ptr, k->via.str.size);
		if (!ok) {
			size_t n = ds_utf8_complete(k->via.str.ptr, k->via.str.size < 48 ? k->via.str.size : 48);
			snprintf(bad, sizeof(bad), "%.*s", (int)n, k->via.str.ptr);
			return bad;
		}
	}
	return NULL;
}

/* params may be nil (no arguments) or a map. */
static int params_map(ds_srv *s, ds_conn *c, const ds_ipc_msg *m, const char *const *allowed)
{
	if (m->params->type == MSGPACK_OBJECT_NIL ||
	    (m->params->type == MSGPACK_OBJECT_ARRAY && m->params->via.array.size == 0))
		return 0;
	if (m->params->type == MSGPACK_OBJECT_ARRAY && m->params->via.array.size == 1 &&
	    m->params->via.array.ptr[0].type == MSGPACK_OBJECT_MAP)
		return 1; /* [ {…} ]: how some msgpack-rpc libraries send one argument */
	if (m->params->type != MSGPACK_OBJECT_MAP) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "params must be a map");
		return -1;
	}
	const char *bad = unknown_key(m->params, allowed);
	if (bad) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "unknown parameter '%s'", bad);
		return -1;
	}
	return 0;
}

static const msgpack_object *the_map(const ds_ipc_msg *m)
{
	if (m->params->type == MSGPACK_OBJECT_ARRAY && m->params->via.array.size == 1)
		return &m->params->via.array.ptr[0];
	return m->params->type == MSGPACK_OBJECT_MAP ? m->params : NULL;
}

static int get_params(ds_srv *s, ds_conn *c, const ds_ipc_msg *m, const char *const *allowed,
		      const msgpack_object **out)
{
	int rc = params_map(s, c, m, allowed);
	if (rc < 0)
		return -1;
	*out = the_map(m);
	if (rc == 1) {
		const char *bad = unknown_key(*out, allowed);
		if (bad) {
			ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "unknown parameter '%s'", bad);
			return -1;
		}
	}
	return 0;
}

static void model_info(ds_srv *s, msgpack_packer *p)
{
	const ds_config *cfg = &s->m->cfg;
	msgpack_pack_map(p, 8);
	kv_str(p, "path", s->conf.model);
	const char *slash = strrchr(s->conf.model, '/');
	kv_str(p, "name", slash && slash[1] ? slash + 1 : s->conf.model);
	kv_i64(p, "vocab_size", cfg->vocab_size);
	kv_i64(p, "context", cfg->max_position_embeddings);
	kv_i64(p, "layers", cfg->num_hidden_layers);
	kv_i64(p, "mtp_layers", s->m->n_mtp);
	kv_i64(p, "eos_token_id", cfg->eos_token_id);
	ds_mp_pack_str(p, "tokenizer");
	if (s->tok)
		msgpack_pack_true(p);
	else
		msgpack_pack_false(p);
}

static void m_hello(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { "version", "client", "ring", NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	int64_t ver = DS_PROTOCOL_VERSION;
	int rc = ds_mp_int(p, "version", 0, INT32_MAX, &ver);
	if (rc == -EINVAL || ver != DS_PROTOCOL_VERSION) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "protocol version %lld is not supported (this server speaks %d)",
			     (long long)ver, DS_PROTOCOL_VERSION);
		return;
	}
	const char *name;
	size_t nlen;
	rc = ds_mp_str(p, "client", &name, &nlen);
	if (rc == -EINVAL || rc == -EILSEQ || (!rc && nlen >= sizeof(c->name))) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "client must be a UTF-8 string of at most %zu bytes",
			     sizeof(c->name) - 1);
		return;
	}
	if (!rc) {
		memcpy(c->name, name, nlen);
		c->name[nlen] = 0;
	}
	int want_ring = 0;
	if (ds_mp_bool(p, "ring", &want_ring) == -EINVAL) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "ring must be a boolean");
		return;
	}
	if (want_ring && c->ring) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "this connection already has a ring");
		return;
	}
	if (want_ring && c->n_requests) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "ask for the ring before the first request");
		return;
	}
	int fds[2], nfds = 0;
	if (want_ring) {
		rc = ds_ring_create((size_t)s->conf.ring_bytes, &c->ring);
		if (rc) {
			ds_log(DS_LOG_ERR, "cannot create a ring for client %llu: %s", (unsigned long long)c->id,
			       strerror(-rc));
			ds_srv_error(s, c, m->msgid, DS_E_INTERNAL, "cannot create the ring: %s", strerror(-rc));
			return;
		}
		ds_ring_writer_fds(c->ring, &fds[0], &fds[1]);
		nfds = 2;
	}
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 6);
	kv_i64(&k.p, "version", DS_PROTOCOL_VERSION);
	kv_str(&k.p, "server", "dsd " DS_VERSION);
	kv_str(&k.p, "backend", s->backend ? s->backend : s->conf.backend);
	ds_mp_pack_str(&k.p, "model");
	model_info(s, &k.p);
	ds_mp_pack_str(&k.p, "ring");
	if (nfds) {
		msgpack_pack_map(&k.p, 2);
		kv_i64(&k.p, "size", s->conf.ring_bytes);
		kv_str(&k.p, "fds", "memfd,eventfd");
	} else {
		msgpack_pack_nil(&k.p);
	}
	ds_mp_pack_str(&k.p, "limits");
	msgpack_pack_map(&k.p, 4);
	kv_i64(&k.p, "max_message_bytes", s->conf.max_message_bytes);
	kv_i64(&k.p, "max_prompt_tokens", s->conf.max_prompt_tokens);
	kv_i64(&k.p, "max_tokens", s->conf.max_tokens);
	kv_i64(&k.p, "max_requests_per_client", s->conf.max_requests_per_client);
	ds_srv_send(s, c, &k.sb, fds, nfds);
}

static int live_add(ds_srv *s, uint64_t id, ds_conn *c)
{
	if (s->n_live == s->cap_live) {
		int cap = s->cap_live ? s->cap_live * 2 : 64;
		ds_live *l = realloc(s->live, sizeof(*l) * (size_t)cap);
		if (!l)
			return -ENOMEM;
		s->live = l;
		s->cap_live = cap;
	}
	s->live[s->n_live++] = (ds_live){ .id = id, .conn = c, .uid = c->uid };
	return 0;
}

/* Reads an int array (token ids in [0, vocab)) into a new buffer with room
 * for `extra` more. */
static int read_ids(const msgpack_object *o, int vocab, size_t extra, int32_t **out, int *n)
{
	if (o->type != MSGPACK_OBJECT_ARRAY)
		return -EINVAL;
	uint32_t k = o->via.array.size;
	int32_t *ids = malloc(sizeof(int32_t) * ((size_t)k + extra + 1));
	if (!ids)
		return -ENOMEM;
	for (uint32_t i = 0; i < k; i++) {
		const msgpack_object *e = &o->via.array.ptr[i];
		if (e->type != MSGPACK_OBJECT_POSITIVE_INTEGER || e->via.u64 >= (uint64_t)vocab) {
			free(ids);
			return -ERANGE;
		}
		ids[i] = (int32_t)e->via.u64;
	}
	*out = ids;
	*n = (int)k;
	return 0;
}

#define BAD(...) do { ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, __VA_ARGS__); goto fail; } while (0)

static void m_generate(ds_srv *s, ds_conn *c, const ds_ipc_msg *m, int chat)
{
	static const char *const allowed[] = {
		"prompt", "ids", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p",
		"repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stop_ids",
		"logprobs", "parse_special", "ignore_eos", "skip_special", "mtp", NULL
	};
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	if (s->stopping) {
		ds_srv_error(s, c, m->msgid, DS_E_UNAVAILABLE, "the server is shutting down");
		return;
	}
	if (c->n_requests >= s->conf.max_requests_per_client) {
		s->rejected++;
		ds_srv_error(s, c, m->msgid, DS_E_LIMIT, "this connection already has %d requests (limits.max_requests_per_client)",
			     c->n_requests);
		return;
	}
	if (s->n_live >= s->conf.max_requests) {
		s->rejected++;
		ds_srv_error(s, c, m->msgid, DS_E_LIMIT, "the server has %d requests (limits.max_requests); retry later",
			     s->n_live);
		return;
	}
	const int V = s->m->cfg.vocab_size;
	ds_req *r = calloc(1, sizeof(*r));
	char *text = NULL;
	int32_t *ids = NULL;
	if (!r) {
		ds_srv_error(s, c, m->msgid, DS_E_INTERNAL, "out of memory");
		return;
	}
	int64_t v;
	double d;
	int rc;
	int max_tokens = (int)(s->conf.default_max_tokens < s->conf.max_tokens ? s->conf.default_max_tokens
										 : s->conf.max_tokens);
	if ((rc = ds_mp_int(p, "max_tokens", 1, s->conf.max_tokens, &v)) == 0)
		max_tokens = (int)v;
	else if (rc != -ENOENT)
		BAD("max_tokens must be an integer in [1, %lld]", (long long)s->conf.max_tokens);
	ds_sampling_default(&r->sp);
	if ((rc = ds_mp_double(p, "temperature", 0, 100, &d)) == 0) r->sp.temperature = (float)d;
	else if (rc != -ENOENT) BAD("temperature must be a number in [0, 100]");
	if ((rc = ds_mp_int(p, "top_k", 0, V, &v)) == 0) r->sp.top_k = (int)v;
	else if (rc != -ENOENT) BAD("top_k must be an integer in [0, %d]", V);
	if ((rc = ds_mp_double(p, "top_p", 0, 1, &d)) == 0) r->sp.top_p = (float)d;
	else if (rc != -ENOENT) BAD("top_p must be a number in (0, 1]");
	if ((rc = ds_mp_double(p, "min_p", 0, 1, &d)) == 0) r->sp.min_p = (float)d;
	else if (rc != -ENOENT) BAD("min_p must be a number in [0, 1]");
	if ((rc = ds_mp_double(p, "repetition_penalty", 0, 100, &d)) == 0) r->sp.repetition_penalty = (float)d;
	else if (rc != -ENOENT) BAD("repetition_penalty must be a number in (0, 100]");
	if ((rc = ds_mp_double(p, "presence_penalty", -100, 100, &d)) == 0) r->sp.presence_penalty = (float)d;
	else if (rc != -ENOENT) BAD("presence_penalty must be a number in [-100, 100]");
	if ((rc = ds_mp_double(p, "frequency_penalty", -100, 100, &d)) == 0) r->sp.frequency_penalty = (float)d;
	else if (rc != -ENOENT) BAD("frequency_penalty must be a number in [-100, 100]");
	uint64_t seed;
	if ((rc = ds_mp_uint64(p, "seed", &seed)) == 0) r->sp.seed = seed;
	else if (rc != -ENOENT) BAD("seed must be a non-negative integer");
	const char *why;
	if (ds_sampling_validate(&r->sp, &why))
		BAD("%s", why);
	int flag;
	int parse_special = 0;
	r->skip_special = 1;
	if ((rc = ds_mp_bool(p, "parse_special", &flag)) == 0) parse_special = flag;
	else if (rc != -ENOENT) BAD("parse_special must be a boolean");
	if ((rc = ds_mp_bool(p, "ignore_eos", &flag)) == 0) r->ignore_eos = flag;
	else if (rc != -ENOENT) BAD("ignore_eos must be a boolean");
	if ((rc = ds_mp_bool(p, "skip_special", &flag)) == 0) r->skip_special = flag;
	else if (rc != -ENOENT) BAD("skip_special must be a boolean");
	r->mtp = 1;
	if ((rc = ds_mp_bool(p, "mtp", &flag)) == 0) r->mtp = flag;
	else if (rc != -ENOENT) BAD("mtp must be a boolean");
	if ((rc = ds_mp_int(p, "logprobs", 0, s->conf.max_logprobs, &v)) == 0) r->logprobs = v ? (int)v : -1;
	else if (rc != -ENOENT) BAD("logprobs must be an integer in [0, %lld]", (long long)s->conf.max_logprobs);
	/* stops */
	const msgpack_object *o = ds_mp_get(p, "stop");
	int n_stops = 0;
	if (o && o->type != MSGPACK_OBJECT_NIL) {
		if (o->type != MSGPACK_OBJECT_ARRAY)
			BAD("stop must be an array of strings");
		n_stops = (int)o->via.array.size;
		if (n_stops > s->conf.max_stop)
			BAD("at most %lld stop strings and ids (limits.max_stop)", (long long)s->conf.max_stop);
		r->stop = calloc((size_t)n_stops + 1, sizeof(char *));
		if (!r->stop)
			BAD("out of memory");
		for (int i = 0; i < n_stops; i++) {
			const msgpack_object *e = &o->via.array.ptr[i];
			if (e->type != MSGPACK_OBJECT_STR || e->via.str.size == 0 || e->via.str.size > 256)
				BAD("stop strings must be non-empty strings of at most 256 bytes");
			if (!ds_utf8_valid(e->via.str.ptr, e->via.str.size))
				BAD("stop string %d is not valid UTF-8", i);
			if (!s->tok)
				BAD("stop strings need the model's tokenizer, which this model lacks; use stop_ids");
			r->stop[i] = strndup(e->via.str.ptr, e->via.str.size);
			if (!r->stop[i])
				BAD("out of memory");
			r->n_stop = i + 1;
			if (e->via.str.size > r->stop_max)
				r->stop_max = e->via.str.size;
		}
	}
	o = ds_mp_get(p, "stop_ids");
	if (o && o->type != MSGPACK_OBJECT_NIL) {
		rc = read_ids(o, V, 0, &r->stop_ids, &r->n_stop_ids);
		if (rc)
			BAD("stop_ids must be an array of token ids in [0, %d)", V);
		if (n_stops + r->n_stop_ids > s->conf.max_stop)
			BAD("at most %lld stop strings and ids (limits.max_stop)", (long long)s->conf.max_stop);
	}
	/* the prompt */
	const char *ptext = NULL;
	size_t plen = 0;
	const msgpack_object *idso = ds_mp_get(p, "ids");
	int has_ids = idso && idso->type != MSGPACK_OBJECT_NIL;
	int n = 0;
	/* room for the output: never more than the context holds */
	size_t extra = (size_t)(max_tokens < s->m->cfg.max_position_embeddings ? max_tokens
										: s->m->cfg.max_position_embeddings) + 1;
	if (chat) {
		const msgpack_object *msgs = ds_mp_get(p, "messages");
		if (has_ids || ds_mp_get(p, "prompt"))
			BAD("chat takes messages, not prompt or ids");
		if (!msgs || msgs->type != MSGPACK_OBJECT_ARRAY || msgs->via.array.size == 0)
			BAD("messages must be a non-empty array of {role, content} maps");
		if (!s->tok) {
			ds_srv_error(s, c, m->msgid, DS_E_UNAVAILABLE, "the model has no tokenizer: chat is not available");
			goto fail;
		}
		uint32_t nm = msgs->via.array.size;
		ds_chat_msg *cm = calloc(nm, sizeof(*cm));
		char **own = calloc((size_t)nm * 2, sizeof(char *));
		int okm = cm && own;
		for (uint32_t i = 0; i < nm && okm; i++) {
			static const char *const mk[] = { "role", "content", NULL };
			const msgpack_object *e = &msgs->via.array.ptr[i];
			const char *role, *content;
			size_t rl, cl;
			if (e->type != MSGPACK_OBJECT_MAP || unknown_key(e, mk) || ds_mp_str(e, "role", &role, &rl) ||
			    ds_mp_str(e, "content", &content, &cl) || memchr(content, 0, cl)) {
				okm = 0;
				break;
			}
			own[2 * i] = strndup(role, rl);
			own[2 * i + 1] = strndup(content, cl);
			cm[i].role = own[2 * i];
			cm[i].content = own[2 * i + 1];
			okm = own[2 * i] && own[2 * i + 1];
		}
		ds_err e = { { 0 } };
		size_t tl = 0;
		rc = okm ? ds_chat_render(s->tok, cm, nm, 1, &text, &tl, &e) : -EINVAL;
		for (uint32_t i = 0; own && i < 2 * nm; i++)
			free(own[i]);
		free(own);
		free(cm);
		if (!okm)
			BAD("each message must be a map {role: string, content: string} of valid UTF-8");
		if (rc == -ENOTSUP) {
			ds_srv_error(s, c, m->msgid, DS_E_UNAVAILABLE, "%s", e.msg[0] ? e.msg : "the model has no chat template");
			goto fail;
		}
		if (rc)
			BAD("%s", e.msg[0] ? e.msg : "cannot render the chat");
		ptext = text;
		plen = tl;
		parse_special = 1; /* the template's own markers are special tokens */
	} else {
		if (ds_mp_get(p, "messages"))
			BAD("generate takes prompt or ids; messages belong to chat");
		rc = ds_mp_str(p, "prompt", &ptext, &plen);
		if (rc == -EILSEQ)
			BAD("prompt is not valid UTF-8");
		if (rc == -EINVAL)
			BAD("prompt must be a string");
		if ((rc == 0) == (has_ids != 0))
			BAD("give exactly one of prompt (text) and ids (token ids)");
	}
	if (has_ids) {
		rc = read_ids(idso, V, extra, &ids, &n);
		if (rc == -ENOMEM)
			BAD("out of memory");
		if (rc)
			BAD("ids must be an array of token ids in [0, %d)", V);
	} else {
		if (!s->tok) {
			ds_srv_error(s, c, m->msgid, DS_E_UNAVAILABLE,
				     "the model has no tokenizer (tokenizer.json): send token ids");
			goto fail;
		}
		int32_t *enc = NULL;
		size_t ne = 0;
		ds_err e = { { 0 } };
		rc = ds_tok_encode(s->tok, ptext, plen, parse_special ? 0 : DS_TOK_NO_SPECIAL, &enc, &ne, &e);
		if (rc)
			BAD("cannot tokenize the prompt: %s", e.msg);
		int bos = !chat && ds_tok_add_bos(s->tok) && ds_tok_bos(s->tok) >= 0;
		if (ne + (size_t)bos > (size_t)s->conf.max_prompt_tokens) {
			free(enc);
			ds_srv_error(s, c, m->msgid, DS_E_LIMIT, "the prompt has %zu tokens; limits.max_prompt_tokens is %lld",
				     ne + (size_t)bos, (long long)s->conf.max_prompt_tokens);
			goto fail;
		}
		ids = malloc(sizeof(int32_t) * (ne + (size_t)bos + extra + 1));
		if (!ids) {
			free(enc);
			BAD("out of memory");
		}
		if (bos)
			ids[0] = ds_tok_bos(s->tok);
		if (ne)
			memcpy(ids + bos, enc, sizeof(int32_t) * ne);
		free(enc);
		n = (int)ne + bos;
	}
	if (n < 1)
		BAD("the prompt is empty");
	if (n > s->conf.max_prompt_tokens) {
		ds_srv_error(s, c, m->msgid, DS_E_LIMIT, "the prompt has %d tokens; limits.max_prompt_tokens is %lld", n,
			     (long long)s->conf.max_prompt_tokens);
		goto fail;
	}
	if (n >= s->m->cfg.max_position_embeddings) {
		ds_srv_error(s, c, m->msgid, DS_E_LIMIT, "the prompt has %d tokens; the model's context is %d", n,
			     s->m->cfg.max_position_embeddings);
		goto fail;
	}
	free(text);
	text = NULL;
	r->tokens = ids;
	ids = NULL;
	r->n_prompt = n;
	r->max_tokens = max_tokens;
	r->id = ++s->next_req_id;
	r->conn = ds_conn_ref(c);
	r->uid = c->uid;
	r->pid = c->pid;
	r->use_ring = c->ring != NULL;
	r->t_arrive = ds_now();
	if (live_add(s, r->id, c)) {
		ds_srv_error(s, c, m->msgid, DS_E_INTERNAL, "out of memory");
		goto fail;
	}
	c->n_requests++;
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 2);
	kv_u64(&k.p, "id", r->id);
	kv_i64(&k.p, "prompt_tokens", n);
	ds_srv_send(s, c, &k.sb, NULL, 0);
	ds_log(DS_LOG_DEBUG, "request %llu from uid %d pid %d: %d prompt tokens, max %d", (unsigned long long)r->id,
	       (int)c->uid, (int)c->pid, n, max_tokens);
	ds_batcher_submit(s->b, r);
	return;
fail:
	free(text);
	free(ids);
	ds_req_free(r);
}

static void m_cancel(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { "id", NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	uint64_t id;
	if (ds_mp_uint64(p, "id", &id)) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "id (a request id) is required");
		return;
	}
	for (int i = 0; i < s->n_live; i++) {
		if (s->live[i].id != id)
			continue;
		/* the connection that made it, the same user, or root */
		if (s->live[i].conn != c && s->live[i].uid != c->uid && c->uid != 0) {
			ds_srv_error(s, c, m->msgid, DS_E_PERMISSION, "request %llu belongs to another user",
				     (unsigned long long)id);
			return;
		}
		ds_batcher_cancel(s->b, id);
		pk k;
		pk_init(&k);
		ds_ipc_pack_response_head(&k.p, m->msgid);
		msgpack_pack_map(&k.p, 1);
		ds_mp_pack_str(&k.p, "cancelled");
		msgpack_pack_true(&k.p);
		ds_srv_send(s, c, &k.sb, NULL, 0);
		return;
	}
	ds_srv_error(s, c, m->msgid, DS_E_NOT_FOUND, "no running request %llu", (unsigned long long)id);
}

static void m_tokenize(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { "text", "parse_special", NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	const char *t;
	size_t n;
	int rc = ds_mp_str(p, "text", &t, &n), special = 0;
	if (rc) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS,
			     rc == -EILSEQ ? "text is not valid UTF-8" : "text (a string) is required");
		return;
	}
	if (ds_mp_bool(p, "parse_special", &special) == -EINVAL) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "parse_special must be a boolean");
		return;
	}
	if (!s->tok) {
		ds_srv_error(s, c, m->msgid, DS_E_UNAVAILABLE, "the model has no tokenizer (tokenizer.json)");
		return;
	}
	int32_t *ids = NULL;
	size_t ni = 0;
	ds_err e = { { 0 } };
	rc = ds_tok_encode(s->tok, t, n, special ? 0 : DS_TOK_NO_SPECIAL, &ids, &ni, &e);
	if (rc) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "cannot tokenize: %s", e.msg);
		return;
	}
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 1);
	ds_mp_pack_str(&k.p, "ids");
	msgpack_pack_array(&k.p, ni);
	for (size_t i = 0; i < ni; i++)
		msgpack_pack_int32(&k.p, ids[i]);
	free(ids);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

static void m_detokenize(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { "ids", "skip_special", NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	const msgpack_object *o = ds_mp_get(p, "ids");
	int32_t *ids = NULL;
	int n = 0, skip = 0;
	if (!o || read_ids(o, s->m->cfg.vocab_size, 0, &ids, &n)) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "ids must be an array of token ids in [0, %d)",
			     s->m->cfg.vocab_size);
		return;
	}
	if (ds_mp_bool(p, "skip_special", &skip) == -EINVAL || !s->tok) {
		free(ids);
		ds_srv_error(s, c, m->msgid, s->tok ? DS_E_INVALID_PARAMS : DS_E_UNAVAILABLE,
			     s->tok ? "skip_special must be a boolean" : "the model has no tokenizer (tokenizer.json)");
		return;
	}
	char *t = NULL;
	size_t tl = 0;
	ds_err e = { { 0 } };
	int rc = ds_tok_decode(s->tok, ids, (size_t)n, skip ? DS_TOK_SKIP_SPECIAL : 0, &t, &tl, &e);
	free(ids);
	if (rc) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_PARAMS, "cannot decode: %s", e.msg);
		return;
	}
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 1);
	ds_mp_pack_str(&k.p, "text");
	ds_mp_pack_strn(&k.p, t, tl);
	free(t);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

static long rss_bytes(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long pages = 0, rss = 0;
	if (f) {
		if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
			rss = 0;
		fclose(f);
	}
	return rss * sysconf(_SC_PAGESIZE);
}

static void m_status(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	ds_batcher_stats st;
	ds_batcher_stats_get(s->b, &st);
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 10);
	kv_str(&k.p, "server", "dsd " DS_VERSION);
	kv_i64(&k.p, "protocol", DS_PROTOCOL_VERSION);
	kv_i64(&k.p, "pid", getpid());
	kv_str(&k.p, "state", s->stopping ? "stopping" : s->loaded ? "serving" : "loading");
	kv_f64(&k.p, "uptime_s", ds_now() - s->t_start);
	kv_str(&k.p, "backend", s->backend ? s->backend : s->conf.backend);
	ds_mp_pack_str(&k.p, "model");
	model_info(s, &k.p);
	ds_mp_pack_str(&k.p, "load");
	ds_wload_snapshot sn;
	int loading = ds_srv_load_snapshot(s, &sn);
	msgpack_pack_map(&k.p, 7);
	/* while loading without byte counts (mmap uploads) progress stays 0 */
	kv_f64(&k.p, "progress", !loading ? 1.0 : sn.total ? (double)sn.done / (double)sn.total : 0.0);
	kv_f64(&k.p, "seconds", loading ? ds_now() - s->t_start : s->load_s);
	kv_u64(&k.p, "bytes_done", loading ? sn.done : s->load_bytes);
	kv_u64(&k.p, "bytes_total", loading ? sn.total : s->load_bytes);
	kv_u64(&k.p, "bytes_streamed", s->load_bytes);
	kv_str(&k.p, "method", !s->load_bytes ? "mmap" : s->load_uring == 1 ? "io_uring" : "pread");
	kv_i64(&k.p, "o_direct", s->load_direct);
	ds_mp_pack_str(&k.p, "memory");
	msgpack_pack_map(&k.p, 5);
	kv_i64(&k.p, "rss_bytes", rss_bytes());
	kv_i64(&k.p, "kv_blocks_total", st.kv_blocks_total);
	kv_i64(&k.p, "kv_blocks_used", st.kv_blocks_total - st.kv_blocks_free - st.kv_blocks_cached);
	kv_i64(&k.p, "block_tokens", st.block_tokens);
	kv_i64(&k.p, "live_requests", st.live);
	ds_mp_pack_str(&k.p, "clients");
	msgpack_pack_map(&k.p, 3);
	kv_i64(&k.p, "connected", s->n_conns);
	kv_i64(&k.p, "requests", s->n_live);
	kv_u64(&k.p, "connections_total", s->connections);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

static void m_stats(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	ds_batcher_stats st;
	ds_batcher_stats_get(s->b, &st);
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 10);
	ds_mp_pack_str(&k.p, "requests");
	msgpack_pack_map(&k.p, 10);
	kv_u64(&k.p, "submitted", st.submitted);
	kv_u64(&k.p, "completed", st.completed);
	kv_u64(&k.p, "cancelled", st.cancelled);
	kv_u64(&k.p, "failed", st.failed);
	kv_u64(&k.p, "rejected", s->rejected);
	kv_i64(&k.p, "running", st.running);
	kv_i64(&k.p, "waiting", st.waiting);
	kv_i64(&k.p, "paused", st.paused);
	kv_i64(&k.p, "live", st.live);
	kv_u64(&k.p, "preempted", st.preempted);
	ds_mp_pack_str(&k.p, "tokens");
	msgpack_pack_map(&k.p, 3);
	kv_u64(&k.p, "prompt", st.prompt_tokens);
	kv_u64(&k.p, "generated", st.generated_tokens);
	kv_f64(&k.p, "per_s", st.tokens_per_s);
	ds_mp_pack_str(&k.p, "ttft_ms");
	msgpack_pack_map(&k.p, 2);
	kv_f64(&k.p, "p50", st.ttft_p50_ms);
	kv_f64(&k.p, "p99", st.ttft_p99_ms);
	ds_mp_pack_str(&k.p, "tpot_ms");
	msgpack_pack_map(&k.p, 2);
	kv_f64(&k.p, "p50", st.tpot_p50_ms);
	kv_f64(&k.p, "p99", st.tpot_p99_ms);
	ds_mp_pack_str(&k.p, "kv");
	msgpack_pack_map(&k.p, 4);
	kv_i64(&k.p, "blocks_total", st.kv_blocks_total);
	kv_i64(&k.p, "blocks_used", st.kv_blocks_total - st.kv_blocks_free - st.kv_blocks_cached);
	kv_i64(&k.p, "blocks_cached", st.kv_blocks_cached);
	kv_i64(&k.p, "block_tokens", st.block_tokens);
	ds_mp_pack_str(&k.p, "prefix_cache");
	/* counted when a request ends, so the rate compares like with like */
	msgpack_pack_map(&k.p, 4);
	kv_u64(&k.p, "prompt_tokens", st.prefix_prompt_tokens);
	kv_u64(&k.p, "hit_tokens", st.prefix_hit_tokens);
	kv_f64(&k.p, "hit_rate",
	       st.prefix_prompt_tokens ? (double)st.prefix_hit_tokens / (double)st.prefix_prompt_tokens : 0.0);
	kv_u64(&k.p, "evictions", st.prefix_evictions);
	ds_mp_pack_str(&k.p, "mtp");
	msgpack_pack_map(&k.p, 6);
	kv_i64(&k.p, "depth", st.mtp_depth);
	kv_i64(&k.p, "max_batch", st.mtp_max_batch);
	kv_u64(&k.p, "drafted", st.mtp_drafted);
	kv_u64(&k.p, "accepted", st.mtp_accepted);
	kv_f64(&k.p, "acceptance_rate", st.mtp_drafted ? (double)st.mtp_accepted / (double)st.mtp_drafted : 0.0);
	/* tokens a sequence's decode step emits: 1 without drafting, up to depth + 1 */
	kv_f64(&k.p, "tokens_per_step", st.decode_steps ? (double)st.decode_tokens / (double)st.decode_steps : 0.0);
	ds_mp_pack_str(&k.p, "experts");
	msgpack_pack_map(&k.p, 3);
	kv_u64(&k.p, "routed", st.expert_routed);
	double worst = 0;
	for (int i = 0; i < st.expert_layers; i++)
		worst = st.expert_max_over_mean[i] > worst ? st.expert_max_over_mean[i] : worst;
	kv_f64(&k.p, "max_over_mean", worst);
	ds_mp_pack_str(&k.p, "layers");
	msgpack_pack_array(&k.p, (size_t)st.expert_layers);
	for (int i = 0; i < st.expert_layers; i++) {
		msgpack_pack_map(&k.p, 3);
		kv_i64(&k.p, "layer", st.expert_layer_id[i]);
		kv_f64(&k.p, "max_over_mean", st.expert_max_over_mean[i]);
		kv_i64(&k.p, "hottest", st.expert_hottest[i]);
	}
	ds_mp_pack_str(&k.p, "engine");
	msgpack_pack_map(&k.p, 2);
	kv_u64(&k.p, "steps", st.steps);
	kv_f64(&k.p, "last_step_ms", st.last_step_ms);
	ds_mp_pack_str(&k.p, "server");
	msgpack_pack_map(&k.p, 4);
	kv_i64(&k.p, "clients", s->n_conns);
	kv_u64(&k.p, "connections_total", s->connections);
	kv_u64(&k.p, "protocol_errors", s->protocol_errors);
	kv_f64(&k.p, "uptime_s", ds_now() - s->t_start);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

/* cache_flush: forget every cached prefix (dsctl cache flush). */
static void m_cache_flush(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	ds_batcher_cache_flush(s->b);
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 1);
	kv_i64(&k.p, "flushed", 1);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

static void m_ps(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	static const char *const allowed[] = { NULL };
	const msgpack_object *p;
	if (get_params(s, c, m, allowed, &p))
		return;
	ds_ps_entry *ps;
	int n;
	ds_batcher_ps(s->b, &ps, &n);
	static const char *const states[] = { "idle", "waiting", "running", "paused" };
	pk k;
	pk_init(&k);
	ds_ipc_pack_response_head(&k.p, m->msgid);
	msgpack_pack_map(&k.p, 1);
	ds_mp_pack_str(&k.p, "requests");
	msgpack_pack_array(&k.p, (size_t)n);
	for (int i = 0; i < n; i++) {
		msgpack_pack_map(&k.p, 8);
		kv_u64(&k.p, "id", ps[i].id);
		kv_i64(&k.p, "uid", ps[i].uid);
		kv_i64(&k.p, "pid", ps[i].pid);
		kv_str(&k.p, "state", states[ps[i].state & 3]);
		kv_i64(&k.p, "prompt_tokens", ps[i].prompt_tokens);
		kv_i64(&k.p, "generated", ps[i].generated);
		kv_i64(&k.p, "cached", ps[i].cached);
		kv_f64(&k.p, "age_s", ps[i].age_s);
	}
	free(ps);
	ds_srv_send(s, c, &k.sb, NULL, 0);
}

void ds_srv_dispatch(ds_srv *s, ds_conn *c, const ds_ipc_msg *m)
{
	if (m->type == DS_MSG_NOTIFY) {
		if (ds_ipc_method_is(m, "resume"))
			ds_batcher_poke(s->b);
		return; /* notifications get no answer, not even an error */
	}
	if (m->type == DS_MSG_RESPONSE) {
		ds_srv_error(s, c, m->msgid, DS_E_INVALID_REQUEST, "the server does not send requests");
		return;
	}
	if (ds_ipc_method_is(m, "hello")) m_hello(s, c, m);
	else if (ds_ipc_method_is(m, "generate")) m_generate(s, c, m, 0);
	else if (ds_ipc_method_is(m, "chat")) m_generate(s, c, m, 1);
	else if (ds_ipc_method_is(m, "cancel")) m_cancel(s, c, m);
	else if (ds_ipc_method_is(m, "tokenize")) m_tokenize(s, c, m);
	else if (ds_ipc_method_is(m, "detokenize")) m_detokenize(s, c, m);
	else if (ds_ipc_method_is(m, "status")) m_status(s, c, m);
	else if (ds_ipc_method_is(m, "stats")) m_stats(s, c, m);
	else if (ds_ipc_method_is(m, "ps")) m_ps(s, c, m);
	else if (ds_ipc_method_is(m, "cache_flush")) m_cache_flush(s, c, m);
	else {
		size_t n = ds_utf8_complete(m->method, m->method_len < 64 ? m->method_len : 64);
		ds_srv_error(s, c, m->msgid, DS_E_UNKNOWN_METHOD, "unknown method '%.*s'", (int)n, m->method);
	}
}
