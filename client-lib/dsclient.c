/* dsclient.c — libdsclient (dsclient.h): a blocking msgpack-rpc client with
 * the daemon's token ring. One handle, one thread at a time; no globals. */
#include "client-lib/dsclient.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ipc/prescan.h"
#include "ipc/proto.h"
#include "ipc/ring.h"

#define DSC_EXPORT __attribute__((visibility("default")))
#define MAX_IN (64u << 20)

typedef struct qev { /* an event from a socket notification, owned */
	struct qev *next;
	ds_event ev;
	ds_client_top top[DS_RING_MAX_TOP];
	char *text;
	char *error;
} qev;

struct ds_client {
	int fd, epfd, timeout_ms;
	uint32_t next_msgid;
	uint8_t *in;
	size_t in_len, in_cap;
	size_t in_keep;      /* bytes of a response handed out: its strings point into in */
	ds_prescan ps;
	ds_ring_reader *ring;
	int armed;
	qev *q_head, *q_tail, *cur;
	ds_client_top cur_top[DS_RING_MAX_TOP];
	char err[512];
	char cur_err[DS_RING_MAX_TEXT + 1];
	int code;
	int dead;
};

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining(int64_t deadline)
{
	if (deadline < 0)
		return -1;
	int64_t r = deadline - now_ms();
	return r < 0 ? 0 : (int)r;
}

static void set_err(ds_client *c, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->err, sizeof(c->err), fmt, ap);
	va_end(ap);
	c->code = code;
}

static int send_all(ds_client *c, const void *buf, size_t len, int64_t deadline)
{
	const uint8_t *p = buf;
	while (len) {
		ssize_t w = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK) {
				c->dead = 1;
				return -errno == -EPIPE ? -ECONNRESET : -errno;
			}
			struct pollfd pf = { .fd = c->fd, .events = POLLOUT };
			int t = remaining(deadline);
			int r = poll(&pf, 1, t);
			if (r == 0)
				return -ETIMEDOUT;
			continue;
		}
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

static int send_sb(ds_client *c, msgpack_sbuffer *sb)
{
	int64_t dl = c->timeout_ms < 0 ? -1 : now_ms() + c->timeout_ms;
	int rc = send_all(c, sb->data, sb->size, dl);
	msgpack_sbuffer_destroy(sb);
	return rc;
}

static void qev_free(qev *q)
{
	if (!q)
		return;
	free(q->text);
	free(q->error);
	free(q);
}

static int finish_code(const char *s, size_t n)
{
	static const char *const names[] = { "", "stop", "length", "cancelled", "error" };
	for (int i = 1; i <= 4; i++)
		if (strlen(names[i]) == n && !memcmp(names[i], s, n))
			return i;
	return DS_CLIENT_FINISH_NONE;
}

static uint64_t mp_u64(const msgpack_object *o)
{
	return o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

/* An "event" notification into the queue. */
static int queue_event(ds_client *c, const msgpack_object *p)
{
	if (!p || p->type != MSGPACK_OBJECT_MAP)
		return -EPROTO;
	qev *q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	ds_event *e = &q->ev;
	e->request_id = mp_u64(ds_mp_get(p, "id"));
	e->seq = (uint32_t)mp_u64(ds_mp_get(p, "seq"));
	const msgpack_object *t = ds_mp_get(p, "token");
	e->token = t && t->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (int32_t)t->via.u64 : -1;
	double lp;
	e->logprob = ds_mp_double(p, "logprob", -INFINITY, INFINITY, &lp) == 0 ? (float)lp : NAN;
	const char *s;
	size_t n;
	if (ds_mp_str(p, "text", &s, &n) == 0) {
		q->text = malloc(n + 1);
		if (q->text) {
			memcpy(q->text, s, n);
			q->text[n] = 0;
			e->text = q->text;
			e->text_len = n;
		}
	}
	if (!e->text)
		e->text = "";
	const msgpack_object *top = ds_mp_get(p, "top");
	if (top && top->type == MSGPACK_OBJECT_ARRAY) {
		for (uint32_t i = 0; i < top->via.array.size && i < DS_RING_MAX_TOP; i++) {
			const msgpack_object *a = &top->via.array.ptr[i];
			if (a->type != MSGPACK_OBJECT_ARRAY || a->via.array.size != 2)
				continue;
			q->top[e->n_top].token = (int32_t)mp_u64(&a->via.array.ptr[0]);
			q->top[e->n_top].logprob = (float)a->via.array.ptr[1].via.f64;
			e->n_top++;
		}
	}
	e->top = q->top;
	if (ds_mp_str(p, "finish", &s, &n) == 0) {
		e->final = 1;
		e->finish = finish_code(s, n);
		if (ds_mp_str(p, "error", &s, &n) == 0 && (q->error = strndup(s, n)))
			e->error = q->error;
		const msgpack_object *st = ds_mp_get(p, "stats");
		e->stats.prompt_tokens = (uint32_t)mp_u64(ds_mp_get(st, "prompt_tokens"));
		e->stats.generated_tokens = (uint32_t)mp_u64(ds_mp_get(st, "generated_tokens"));
		e->stats.cached_tokens = (uint32_t)mp_u64(ds_mp_get(st, "cached_tokens"));
		e->stats.drafted = (uint32_t)mp_u64(ds_mp_get(st, "drafted"));
		e->stats.accepted = (uint32_t)mp_u64(ds_mp_get(st, "accepted"));
		e->stats.ttft_ns = mp_u64(ds_mp_get(st, "ttft_ns"));
		e->stats.total_ns = mp_u64(ds_mp_get(st, "total_ns"));
		e->stats.prefill_ns = mp_u64(ds_mp_get(st, "prefill_ns"));
		e->stats.decode_ns = mp_u64(ds_mp_get(st, "decode_ns"));
	}
	if (c->q_tail)
		c->q_tail->next = q;
	else
		c->q_head = q;
	c->q_tail = q;
	return 0;
}

/* Reads what the socket has (waiting up to timeout_ms for the first byte)
 * and handles whole messages: notifications are queued; a response with
 * msgid `want` is decoded into *resp (then 1 is returned). */
static int pump(ds_client *c, int timeout_ms, uint32_t want, ds_ipc_msg *resp)
{
	if (c->dead)
		return -ECONNRESET;
	if (c->in_keep) { /* the caller is done with the last response */
		memmove(c->in, c->in + c->in_keep, c->in_len - c->in_keep);
		c->in_len -= c->in_keep;
		c->in_keep = 0;
	}
	int waited = 0;
	for (;;) {
		/* whole messages already buffered */
		for (;;) {
			int sc = ds_prescan_feed(&c->ps, c->in, c->in_len);
			if (sc == 0)
				break;
			if (sc < 0) {
				c->dead = 1;
				return -EPROTO;
			}
			size_t len = c->ps.pos;
			ds_ipc_msg m;
			uint32_t id;
			const char *why;
			int rc = ds_ipc_decode(c->in, len, &m, &id, &why), got = 0;
			if (!rc && m.type == DS_MSG_NOTIFY) {
				if (ds_ipc_method_is(&m, "event")) {
					queue_event(c, m.params);
				} else if (ds_ipc_method_is(&m, "error") && m.params->type == MSGPACK_OBJECT_ARRAY &&
					   m.params->via.array.size == 2 && m.params->via.array.ptr[1].type == MSGPACK_OBJECT_STR) {
					const msgpack_object *a = m.params->via.array.ptr;
					set_err(c, (int)a[0].via.i64, "%.*s", (int)a[1].via.str.size, a[1].via.str.ptr);
				}
			} else if (!rc && m.type == DS_MSG_RESPONSE && m.msgid == want && resp) {
				got = 1;
			}
			ds_prescan_init(&c->ps, MAX_IN, DS_IPC_MAX_DEPTH);
			if (got) {
				/* msgpack-c's strings point into c->in: keep the bytes until the next pump */
				c->in_keep = len;
				*resp = m;
				return 1;
			}
			memmove(c->in, c->in + len, c->in_len - len);
			c->in_len -= len;
			ds_ipc_msg_clear(&m);
		}
		if (c->in_cap - c->in_len < 65536) {
			size_t cap = c->in_cap ? c->in_cap * 2 : 131072;
			uint8_t *n = realloc(c->in, cap);
			if (!n)
				return -ENOMEM;
			c->in = n;
			c->in_cap = cap;
		}
		ssize_t r = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
		if (r > 0) {
			c->in_len += (size_t)r;
			continue;
		}
		if (r == 0) {
			c->dead = 1;
			return -ECONNRESET;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK) {
			c->dead = 1;
			return -ECONNRESET;
		}
		if (waited || timeout_ms == 0)
			return 0;
		struct pollfd pf = { .fd = c->fd, .events = POLLIN };
		int pr = poll(&pf, 1, timeout_ms);
		if (pr <= 0)
			return pr < 0 && errno == EINTR ? -EINTR : 0;
		waited = 1;
	}
}

static int err_from_code(int code)
{
	switch (code) {
	case DS_E_INVALID_PARAMS: return -EINVAL;
	case DS_E_LIMIT: return -EBUSY;
	case DS_E_NOT_FOUND: return -ENOENT;
	case DS_E_PERMISSION: return -EACCES;
	case DS_E_UNAVAILABLE: return -ENOTSUP;
	case DS_E_UNKNOWN_METHOD: return -ENOSYS;
	case DS_E_TOO_LARGE: return -EMSGSIZE;
	default: return -EPROTO;
	}
}

/* Waits for the response to msgid; on an error response returns its errno. */
static int await(ds_client *c, uint32_t msgid, ds_ipc_msg *resp)
{
	int64_t dl = c->timeout_ms < 0 ? -1 : now_ms() + c->timeout_ms;
	for (;;) {
		int rc = pump(c, remaining(dl), msgid, resp);
		if (rc == 1)
			break;
		if (rc < 0)
			return rc;
		if (dl >= 0 && now_ms() >= dl)
			return -ETIMEDOUT;
	}
	const msgpack_object *e = resp->error;
	if (e && e->type == MSGPACK_OBJECT_ARRAY && e->via.array.size == 2) {
		const msgpack_object *a = e->via.array.ptr;
		int code = a[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (int)a[0].via.u64 : DS_E_INTERNAL;
		if (a[1].type == MSGPACK_OBJECT_STR)
			set_err(c, code, "%.*s", (int)a[1].via.str.size, a[1].via.str.ptr);
		ds_ipc_msg_clear(resp);
		return err_from_code(code);
	}
	return 0;
}

static void begin(ds_client *c, msgpack_sbuffer *sb, msgpack_packer *pk, const char *method, uint32_t *msgid)
{
	msgpack_sbuffer_init(sb);
	msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
	*msgid = c->next_msgid++;
	ds_ipc_pack_request_head(pk, *msgid, method);
}

/* hello: reads the response with recvmsg to collect the ring's fds. */
static int hello(ds_client *c, const char *name, int want_ring)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint32_t id;
	begin(c, &sb, &pk, "hello", &id);
	msgpack_pack_map(&pk, 3);
	ds_mp_pack_str(&pk, "version");
	msgpack_pack_int(&pk, DS_PROTOCOL_VERSION);
	ds_mp_pack_str(&pk, "client");
	ds_mp_pack_str(&pk, name);
	ds_mp_pack_str(&pk, "ring");
	if (want_ring)
		msgpack_pack_true(&pk);
	else
		msgpack_pack_false(&pk);
	int rc = send_sb(c, &sb);
	if (rc)
		return rc;
	/* the first bytes of the answer carry the fds: receive them with recvmsg */
	int fds[DS_IPC_MAX_FDS], nfds = 0;
	int64_t dl = c->timeout_ms < 0 ? -1 : now_ms() + c->timeout_ms;
	if (c->in_cap < 131072) {
		uint8_t *n = realloc(c->in, 131072);
		if (!n)
			return -ENOMEM;
		c->in = n;
		c->in_cap = 131072;
	}
	for (;;) {
		struct pollfd pf = { .fd = c->fd, .events = POLLIN };
		int pr = poll(&pf, 1, remaining(dl));
		if (pr == 0)
			return -ETIMEDOUT;
		ssize_t r = ds_ipc_recv_fds(c->fd, c->in + c->in_len, c->in_cap - c->in_len, fds, &nfds);
		if (r == -EAGAIN || r == -EINTR)
			continue;
		if (r <= 0)
			return r == 0 ? -ECONNRESET : (int)r;
		c->in_len += (size_t)r;
		if (ds_prescan_feed(&c->ps, c->in, c->in_len) != 0)
			break;
	}
	ds_ipc_msg m;
	rc = await(c, id, &m);
	if (rc) {
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		return rc;
	}
	const msgpack_object *ring = ds_mp_get(m.result, "ring");
	if (want_ring && ring && ring->type == MSGPACK_OBJECT_MAP) {
		if (nfds != 2) {
			rc = -EPROTO;
		} else {
			rc = ds_ring_attach(fds[0], fds[1], &c->ring);
			if (!rc)
				nfds = 0; /* the reader owns them */
		}
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	ds_ipc_msg_clear(&m);
	if (!rc && c->ring) {
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 1 };
		epoll_ctl(c->epfd, EPOLL_CTL_ADD, ds_ring_reader_efd(c->ring), &ev);
	}
	return rc;
}

DSC_EXPORT int ds_client_connect(const char *path, const ds_client_opts *opts, ds_client **ret)
{
	char buf[256];
	if (!path)
		path = getenv("DSD_SOCKET");
	if (!path || !*path) {
		/* the user's own daemon when one is listening, else the system
		 * service's socket (where a member of group dsd gets in) */
		const char *x = getenv("XDG_RUNTIME_DIR");
		struct stat st;
		if (geteuid() != 0 && x && snprintf(buf, sizeof(buf), "%s/dsd.sock", x) < (int)sizeof(buf) &&
		    stat(buf, &st) == 0)
			path = buf;
		else
			path = "/run/dsd/dsd.sock";
	}
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(a.sun_path))
		return -ENAMETOOLONG;
	strcpy(a.sun_path, path);
	ds_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->timeout_ms = opts && opts->timeout_ms ? opts->timeout_ms : 30000;
	c->next_msgid = 1;
	c->epfd = -1;
	ds_prescan_init(&c->ps, MAX_IN, DS_IPC_MAX_DEPTH);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int rc = 0;
	if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		rc = -errno;
	if (!rc) {
		fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
		c->epfd = epoll_create1(EPOLL_CLOEXEC);
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 0 };
		if (c->epfd < 0 || epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
			rc = -errno;
	}
	if (!rc)
		rc = hello(c, opts && opts->name ? opts->name : "libdsclient", !(opts && opts->no_ring));
	if (rc) {
		ds_client_free(c);
		return rc;
	}
	*ret = c;
	return 0;
}

DSC_EXPORT ds_client *ds_client_free(ds_client *c)
{
	if (!c)
		return NULL;
	if (c->fd >= 0)
		close(c->fd);
	if (c->epfd >= 0)
		close(c->epfd);
	ds_ring_reader_free(c->ring);
	qev_free(c->cur);
	while (c->q_head) {
		qev *q = c->q_head;
		c->q_head = q->next;
		qev_free(q);
	}
	free(c->in);
	free(c);
	return NULL;
}

DSC_EXPORT const char *ds_client_last_error(const ds_client *c)
{
	return c->err;
}

DSC_EXPORT int ds_client_last_code(const ds_client *c)
{
	return c->code;
}

DSC_EXPORT void ds_gen_params_init(ds_gen_params *p)
{
	memset(p, 0, sizeof(*p));
	p->temperature = p->top_p = p->min_p = NAN;
	p->repetition_penalty = p->presence_penalty = p->frequency_penalty = NAN;
	p->top_k = -1;
	p->logprobs = -1;
}

static void pack_params(msgpack_packer *pk, const ds_gen_params *p, const ds_client_msg *msgs, size_t n_msgs)
{
	int n = (msgs ? 1 : 1) + (p->max_tokens > 0) + !isnan(p->temperature) + (p->top_k >= 0) + !isnan(p->top_p) +
		!isnan(p->min_p) + !isnan(p->repetition_penalty) + !isnan(p->presence_penalty) +
		!isnan(p->frequency_penalty) + (p->has_seed != 0) + (p->n_stop > 0) + (p->n_stop_ids > 0) +
		(p->logprobs >= 0) + (p->no_mtp != 0) + 2;
	msgpack_pack_map(pk, (size_t)n);
	if (msgs) {
		ds_mp_pack_str(pk, "messages");
		msgpack_pack_array(pk, n_msgs);
		for (size_t i = 0; i < n_msgs; i++) {
			msgpack_pack_map(pk, 2);
			ds_mp_pack_str(pk, "role");
			ds_mp_pack_str(pk, msgs[i].role ? msgs[i].role : "");
			ds_mp_pack_str(pk, "content");
			ds_mp_pack_str(pk, msgs[i].content ? msgs[i].content : "");
		}
	} else if (p->prompt) {
		ds_mp_pack_str(pk, "prompt");
		ds_mp_pack_str(pk, p->prompt);
	} else {
		ds_mp_pack_str(pk, "ids");
		msgpack_pack_array(pk, p->n_ids);
		for (size_t i = 0; i < p->n_ids; i++)
			msgpack_pack_int32(pk, p->ids[i]);
	}
#define NUM(field, key) if (!isnan(p->field)) { ds_mp_pack_str(pk, key); msgpack_pack_double(pk, p->field); }
	if (p->max_tokens > 0) {
		ds_mp_pack_str(pk, "max_tokens");
		msgpack_pack_int32(pk, p->max_tokens);
	}
	NUM(temperature, "temperature")
	if (p->top_k >= 0) {
		ds_mp_pack_str(pk, "top_k");
		msgpack_pack_int32(pk, p->top_k);
	}
	NUM(top_p, "top_p")
	NUM(min_p, "min_p")
	NUM(repetition_penalty, "repetition_penalty")
	NUM(presence_penalty, "presence_penalty")
	NUM(frequency_penalty, "frequency_penalty")
#undef NUM
	if (p->has_seed) {
		ds_mp_pack_str(pk, "seed");
		msgpack_pack_uint64(pk, p->seed);
	}
	if (p->n_stop) {
		ds_mp_pack_str(pk, "stop");
		msgpack_pack_array(pk, p->n_stop);
		for (size_t i = 0; i < p->n_stop; i++)
			ds_mp_pack_str(pk, p->stop[i]);
	}
	if (p->n_stop_ids) {
		ds_mp_pack_str(pk, "stop_ids");
		msgpack_pack_array(pk, p->n_stop_ids);
		for (size_t i = 0; i < p->n_stop_ids; i++)
			msgpack_pack_int32(pk, p->stop_ids[i]);
	}
	if (p->logprobs >= 0) {
		ds_mp_pack_str(pk, "logprobs");
		msgpack_pack_int32(pk, p->logprobs);
	}
	ds_mp_pack_str(pk, "parse_special");
	if (p->parse_special)
		msgpack_pack_true(pk);
	else
		msgpack_pack_false(pk);
	ds_mp_pack_str(pk, "ignore_eos");
	if (p->ignore_eos)
		msgpack_pack_true(pk);
	else
		msgpack_pack_false(pk);
	if (p->no_mtp) {
		ds_mp_pack_str(pk, "mtp");
		msgpack_pack_false(pk);
	}
}

static int start(ds_client *c, const char *method, const ds_gen_params *p, const ds_client_msg *msgs, size_t n,
		 uint64_t *id)
{
	if (!c || !p || (!msgs && !p->prompt && !p->ids) || !id)
		return -EINVAL;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint32_t mid;
	begin(c, &sb, &pk, method, &mid);
	pack_params(&pk, p, msgs, n);
	int rc = send_sb(c, &sb);
	if (rc)
		return rc;
	ds_ipc_msg m;
	rc = await(c, mid, &m);
	if (rc)
		return rc;
	uint64_t v;
	rc = ds_mp_uint64(m.result, "id", &v) ? -EPROTO : 0;
	if (!rc)
		*id = v;
	ds_ipc_msg_clear(&m);
	return rc;
}

DSC_EXPORT int ds_client_generate(ds_client *c, const ds_gen_params *p, uint64_t *id)
{
	return start(c, "generate", p, NULL, 0, id);
}

DSC_EXPORT int ds_client_chat(ds_client *c, const ds_client_msg *msgs, size_t n, const ds_gen_params *p, uint64_t *id)
{
	if (!msgs || !n)
		return -EINVAL;
	return start(c, "chat", p, msgs, n, id);
}

/* One event from the ring into ev (1), or 0. */
static int from_ring(ds_client *c, ds_event *ev)
{
	ds_ring_event re;
	int rc = ds_ring_next(c->ring, &re);
	if (ds_ring_take_writer_waiting(c->ring)) {
		/* the daemon paused a stream for room: tell it we read */
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		ds_ipc_pack_notify_head(&pk, "resume");
		msgpack_pack_nil(&pk);
		send_sb(c, &sb);
	}
	if (rc <= 0)
		return rc;
	memset(ev, 0, sizeof(*ev));
	ev->request_id = re.request_id;
	ev->seq = re.seq;
	ev->token = re.token;
	ev->logprob = re.logprob;
	ev->text = re.text;
	ev->text_len = re.text_len;
	ev->n_top = re.n_top;
	for (int i = 0; i < re.n_top; i++) { /* copied: the mapping is not aligned for the caller's type */
		memcpy(&c->cur_top[i].token, &re.top[i].token, 4);
		memcpy(&c->cur_top[i].logprob, &re.top[i].logprob, 4);
	}
	ev->top = c->cur_top;
	if (re.type == DS_REC_FINAL) {
		ds_ring_stats st;
		memcpy(&st, re.stats, sizeof(st));
		ev->final = 1;
		ev->finish = re.finish;
		ev->stats = (ds_gen_stats){ st.prompt_tokens, st.generated_tokens, st.cached_tokens,
					    st.ttft_ns, st.total_ns, st.prefill_ns, st.decode_ns, st.drafted, st.accepted };
		if (re.finish == DS_FINISH_ERROR) {
			memcpy(c->cur_err, re.text, re.text_len);
			c->cur_err[re.text_len] = 0;
			ev->error = c->cur_err;
			ev->text = "";
			ev->text_len = 0;
		}
	}
	return 1;
}

DSC_EXPORT int ds_client_next_event(ds_client *c, int timeout_ms, ds_event *ev)
{
	if (!c || !ev)
		return -EINVAL;
	qev_free(c->cur);
	c->cur = NULL;
	if (c->armed) {
		ds_ring_disarm(c->ring);
		c->armed = 0;
	}
	int64_t dl = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		if (c->q_head) {
			qev *q = c->q_head;
			c->q_head = q->next;
			if (!c->q_head)
				c->q_tail = NULL;
			c->cur = q;
			*ev = q->ev;
			ev->top = q->top;
			return 0;
		}
		if (c->ring) {
			int rc = from_ring(c, ev);
			if (rc < 0)
				return rc;
			if (rc == 1)
				return 0;
		}
		int rc = pump(c, 0, 0, NULL);
		if (rc < 0)
			return rc;
		if (c->q_head)
			continue;
		int left = remaining(dl);
		if (left == 0) {
			if (c->ring && timeout_ms == 0 && ds_ring_arm(c->ring) == 0)
				c->armed = 1;
			return timeout_ms == 0 ? -EAGAIN : -ETIMEDOUT;
		}
		if (c->ring) {
			/* futex sleep in slices, so a daemon that dies is noticed */
			int slice = left < 0 || left > 200 ? 200 : left;
			rc = ds_ring_wait(c->ring, slice);
			if (rc == -EINTR)
				return -EINTR;
		} else {
			rc = pump(c, left < 0 ? -1 : left, 0, NULL);
			if (rc < 0)
				return rc;
		}
	}
}

DSC_EXPORT int ds_client_fd(const ds_client *c)
{
	return c ? c->epfd : -EINVAL;
}

DSC_EXPORT int ds_client_cancel(ds_client *c, uint64_t id)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint32_t mid;
	begin(c, &sb, &pk, "cancel", &mid);
	msgpack_pack_map(&pk, 1);
	ds_mp_pack_str(&pk, "id");
	msgpack_pack_uint64(&pk, id);
	int rc = send_sb(c, &sb);
	if (rc)
		return rc;
	ds_ipc_msg m;
	rc = await(c, mid, &m);
	if (!rc)
		ds_ipc_msg_clear(&m);
	return rc;
}

/* ---- msgpack to JSON ---- */

typedef struct jbuf {
	char *p;
	size_t n, cap;
	int oom;
} jbuf;

static void jput(jbuf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->n + n + 1 > b->cap) {
		size_t cap = (b->n + n + 1) * 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->oom = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}

static void jfmt(jbuf *b, const char *fmt, ...)
{
	char t[64];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(t, sizeof(t), fmt, ap);
	va_end(ap);
	jput(b, t, n > 0 ? (size_t)n : 0);
}

static void jstr(jbuf *b, const char *s, size_t n)
{
	jput(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch == '"' || ch == '\\') {
			char e[2] = { '\\', (char)ch };
			jput(b, e, 2);
		} else if (ch < 0x20) {
			jfmt(b, "\\u%04x", ch);
		} else {
			jput(b, (const char *)&ch, 1);
		}
	}
	jput(b, "\"", 1);
}

static void to_json(jbuf *b, const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL: jput(b, "null", 4); break;
	case MSGPACK_OBJECT_BOOLEAN: o->via.boolean ? jput(b, "true", 4) : jput(b, "false", 5); break;
	case MSGPACK_OBJECT_POSITIVE_INTEGER: jfmt(b, "%llu", (unsigned long long)o->via.u64); break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: jfmt(b, "%lld", (long long)o->via.i64); break;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		if (isfinite(o->via.f64))
			jfmt(b, "%.10g", o->via.f64);
		else
			jput(b, "null", 4);
		break;
	case MSGPACK_OBJECT_STR: jstr(b, o->via.str.ptr, o->via.str.size); break;
	case MSGPACK_OBJECT_ARRAY:
		jput(b, "[", 1);
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			if (i)
				jput(b, ",", 1);
			to_json(b, &o->via.array.ptr[i]);
		}
		jput(b, "]", 1);
		break;
	case MSGPACK_OBJECT_MAP:
		jput(b, "{", 1);
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			const msgpack_object_kv *kv = &o->via.map.ptr[i];
			if (i)
				jput(b, ",", 1);
			if (kv->key.type == MSGPACK_OBJECT_STR)
				jstr(b, kv->key.via.str.ptr, kv->key.via.str.size);
			else
				jstr(b, "?", 1);
			jput(b, ":", 1);
			to_json(b, &kv->val);
		}
		jput(b, "}", 1);
		break;
	default: jput(b, "null", 4); break;
	}
}

DSC_EXPORT int ds_client_call_json(ds_client *c, const char *method, char **json)
{
	if (!c || !method || !json)
		return -EINVAL;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint32_t mid;
	begin(c, &sb, &pk, method, &mid);
	msgpack_pack_nil(&pk);
	int rc = send_sb(c, &sb);
	if (rc)
		return rc;
	ds_ipc_msg m;
	rc = await(c, mid, &m);
	if (rc)
		return rc;
	jbuf b = { 0 };
	to_json(&b, m.result);
	ds_ipc_msg_clear(&m);
	if (b.oom || !b.p) {
		free(b.p);
		return -ENOMEM;
	}
	*json = b.p;
	return 0;
}

DSC_EXPORT int ds_client_tokenize(ds_client *c, const char *text, int parse_special, int32_t **ids, size_t *n)
{
	if (!c || !text || !ids || !n)
		return -EINVAL;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint32_t mid;
	begin(c, &sb, &pk, "tokenize", &mid);
	msgpack_pack_map(&pk, 2);
	ds_mp_pack_str(&pk, "text");
	ds_mp_pack_str(&pk, text);
	ds_mp_pack_str(&pk, "parse_special");
	if (parse_special)
		msgpack_pack_true(&pk);
	else
		msgpack_pack_false(&pk);
	int rc = send_sb(c, &sb);
	if (rc)
		return rc;
	ds_ipc_msg m;
	rc = await(c, mid, &m);
	if (rc)
		return rc;
	const msgpack_object *a = ds_mp_get(m.result, "ids");
	if (!a || a->type != MSGPACK_OBJECT_ARRAY) {
		ds_ipc_msg_clear(&m);
		return -EPROTO;
	}
	int32_t *out = malloc(sizeof(int32_t) * (a->via.array.size + 1));
	if (!out) {
		ds_ipc_msg_clear(&m);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < a->via.array.size; i++)
		out[i] = (int32_t)mp_u64(&a->via.array.ptr[i]);
	*n = a->via.array.size;
	*ids = out;
	ds_ipc_msg_clear(&m);
	return 0;
}
