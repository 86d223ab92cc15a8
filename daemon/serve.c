/* serve.c — `dsd serve` and `dsd check-config`: configuration, the socket
 * (bound here or passed by systemd), the model, and the epoll loop that
 * serves every client without ever waiting on the engine thread. */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "daemon/commands.h"
#include "daemon/log.h"
#include "daemon/serve.h"

#define READ_CHUNK 65536
#define SOCK_BUDGET (256 * 1024)
/* Largest batch at which drafting with the MTP module still speeds decoding
 * up, per backend ([scheduler] mtp_max_batch = -1): measured with
 * `make bench-spec` (docs/PERFORMANCE.md, speculative decoding). On the CPU
 * a 2-token step costs 1.6-1.9x a 1-token one for the models we can measure
 * (they fit in cache: compute-bound even at batch 1), so drafting never pays
 * and MTP is off unless configured. On an H100 the verify-2/1 step ratio of
 * the V2-Lite-shaped model is 1.27 at batch 1, 1.43 at 4 and 1.49 at 16:
 * with the trained model's acceptance (0.55-0.8) drafting can gain up to
 * about 4 sequences and not beyond. */
#define DS_MTP_MAX_BATCH_CPU 0
#define DS_MTP_MAX_BATCH_CUDA 4

/* ---- configuration ---- */

static void usage(FILE *f, const char *verb)
{
	size_t n;
	const ds_conf_key *k = ds_conf_keys(&n);
	fprintf(f, "usage: dsd %s [--config PATH] [--KEY VALUE]...\n\n", verb);
	fprintf(f, "  --config PATH   configuration file (default %s, if it exists)\n", DS_DEFAULT_CONFIG);
	for (size_t i = 0; i < n; i++)
		fprintf(f, "  --%-22s %s.%s (default '%s')\n", k[i].flag, k[i].section, k[i].name, k[i].def);
	fprintf(f, "\nFlags win over the file. See conf/dsd.conf.example or dsd.conf(5).\n");
}

/* Loads defaults, the file, then the flags (in s->flags). */
static int load_conf(ds_srv *s, ds_conf *c, ds_err *e)
{
	ds_conf_defaults(c);
	int rc = ds_conf_load(c, s->conf_path, e);
	if (rc == -ENOENT && !s->conf_required)
		rc = 0;
	if (rc)
		return rc;
	for (int i = 0; i < s->n_flags; i += 2) {
		ds_err sub = { { 0 } };
		rc = ds_conf_set_flag(c, s->flags[i], s->flags[i + 1], &sub);
		if (rc)
			return ds_errf(e, rc, "--%s: %s", s->flags[i], sub.msg);
	}
	return ds_conf_check(c, e);
}

static int parse_args(ds_srv *s, int argc, char **argv, const char *verb)
{
	snprintf(s->conf_path, sizeof(s->conf_path), "%s", DS_DEFAULT_CONFIG);
	s->flags = calloc((size_t)argc + 1, sizeof(char *));
	if (!s->flags)
		return 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout, verb);
			return -1;
		}
		if (strncmp(a, "--", 2)) {
			fprintf(stderr, "dsd %s: unexpected argument '%s'\n", verb, a);
			return 2;
		}
		const char *name = a + 2, *eq = strchr(name, '='), *val;
		char key[64];
		size_t kl = eq ? (size_t)(eq - name) : strlen(name);
		if (kl >= sizeof(key)) {
			fprintf(stderr, "dsd %s: unknown option '%s'\n", verb, a);
			return 2;
		}
		memcpy(key, name, kl);
		key[kl] = 0;
		if (eq)
			val = eq + 1;
		else if (i + 1 < argc)
			val = argv[++i];
		else {
			fprintf(stderr, "dsd %s: option --%s needs a value\n", verb, key);
			return 2;
		}
		if (!strcmp(key, "config")) {
			snprintf(s->conf_path, sizeof(s->conf_path), "%s", val);
			s->conf_required = 1;
			continue;
		}
		ds_conf probe;
		ds_conf_defaults(&probe);
		ds_err e = { { 0 } };
		if (ds_conf_set_flag(&probe, key, val, &e)) {
			fprintf(stderr, "dsd %s: %s\n", verb, e.msg);
			return 2;
		}
		s->flags[s->n_flags++] = strdup(key);
		s->flags[s->n_flags++] = (char *)val;
	}
	return 0;
}

static void free_flags(ds_srv *s)
{
	for (int i = 0; i < s->n_flags; i += 2)
		free(s->flags[i]);
	free(s->flags);
}

/* Resolves the allow-lists (names or numeric ids). */
static int resolve_allow(ds_srv *s, const ds_conf *c, ds_err *e)
{
	int nu = 0, ng = 0;
	for (int pass = 0; pass < 2; pass++) {
		char buf[DS_CONF_STR], *save = NULL;
		snprintf(buf, sizeof(buf), "%s", pass ? c->allow_groups : c->allow_users);
		for (char *t = strtok_r(buf, ", \t", &save); t; t = strtok_r(NULL, ", \t", &save)) {
			char *end;
			long id = strtol(t, &end, 10);
			if (*end || end == t) {
				if (pass) {
					struct group *g = getgrnam(t);
					if (!g)
						return ds_errf(e, -EINVAL, "server.allow_groups: no group '%s'", t);
					id = g->gr_gid;
				} else {
					struct passwd *pw = getpwnam(t);
					if (!pw)
						return ds_errf(e, -EINVAL, "server.allow_users: no user '%s'", t);
					id = pw->pw_uid;
				}
			}
			if ((pass ? ng : nu) >= DS_ALLOW_MAX)
				return ds_errf(e, -EINVAL, "server.allow_%s: more than %d entries", pass ? "groups" : "users",
					       DS_ALLOW_MAX);
			if (pass)
				s->allow_gid[ng++] = (gid_t)id;
			else
				s->allow_uid[nu++] = (uid_t)id;
		}
	}
	s->n_allow_uid = nu;
	s->n_allow_gid = ng;
	return 0;
}

static int allowed(const ds_srv *s, uid_t uid, gid_t gid)
{
	if (!s->n_allow_uid && !s->n_allow_gid)
		return 1;
	for (int i = 0; i < s->n_allow_uid; i++)
		if (s->allow_uid[i] == uid)
			return 1;
	for (int i = 0; i < s->n_allow_gid; i++)
		if (s->allow_gid[i] == gid)
			return 1;
	return 0;
}

static void default_socket(const ds_conf *c, char *out, size_t len)
{
	if (c->socket[0])
		snprintf(out, len, "%s", c->socket);
	else if (geteuid() == 0)
		snprintf(out, len, "/run/dsd/dsd.sock");
	else if (getenv("XDG_RUNTIME_DIR"))
		snprintf(out, len, "%s/dsd.sock", getenv("XDG_RUNTIME_DIR"));
	else
		out[0] = 0;
}

int ds_cmd_check_config(int argc, char **argv)
{
	ds_srv s = { 0 };
	int rc = parse_args(&s, argc, argv, "check-config");
	if (rc) {
		free_flags(&s);
		return rc < 0 ? 0 : rc;
	}
	ds_err e = { { 0 } };
	ds_conf c;
	rc = load_conf(&s, &c, &e);
	if (!rc)
		rc = resolve_allow(&s, &c, &e);
	if (rc) {
		fprintf(stderr, "dsd check-config: %s\n", e.msg);
		free_flags(&s);
		return 1;
	}
	size_t n;
	const ds_conf_key *k = ds_conf_keys(&n);
	const char *sec = "";
	printf("# effective configuration (%s%s)\n", s.conf_path,
	       access(s.conf_path, R_OK) ? ": not found, defaults" : "");
	for (size_t i = 0; i < n; i++) {
		char v[DS_CONF_STR + 8];
		ds_conf_format(&c, &k[i], v, sizeof(v));
		if (strcmp(sec, k[i].section))
			printf("%s[%s]\n", i ? "\n" : "", sec = k[i].section);
		printf("%s = %s\n", k[i].name, v);
	}
	struct stat st;
	if (stat(c.model, &st) || !S_ISDIR(st.st_mode))
		fprintf(stderr, "dsd check-config: warning: model.path '%s' is not a directory\n", c.model);
	free_flags(&s);
	return 0;
}

/* ---- connections ---- */

static void conn_update_events(ds_srv *s, ds_conn *c)
{
	struct epoll_event ev = { .events = EPOLLRDHUP, .data.ptr = c };
	size_t pending = c->out_len - c->out_off;
	if (!c->closing && pending < (size_t)SOCK_BUDGET * 4)
		ev.events |= EPOLLIN; /* a client that does not read its answers stops being read */
	if (pending)
		ev.events |= EPOLLOUT;
	epoll_ctl(s->epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void conn_close(ds_srv *s, ds_conn *c)
{
	if (c->fd < 0)
		return;
	epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	atomic_store(&c->gone, 1);
	if (c->n_requests)
		ds_batcher_conn_gone(s->b, c);
	for (ds_conn **pp = &s->conns; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	s->n_conns--;
	ds_log(DS_LOG_DEBUG, "client %llu (uid %d pid %d) disconnected with %d requests", (unsigned long long)c->id,
	       (int)c->uid, (int)c->pid, c->n_requests);
	/* events of this epoll batch may still name it: unref after the batch */
	c->next = s->dead;
	s->dead = c;
}

static void out_sent(ds_srv *s, ds_conn *c, size_t n)
{
	long left = atomic_fetch_sub(&c->out_bytes, (long)n) - (long)n;
	if (left <= SOCK_BUDGET && atomic_load(&c->want_resume) && atomic_exchange(&c->want_resume, 0))
		ds_batcher_poke(s->b);
}

/* Writes what it can; 0, or -1 when the connection was closed. */
static int conn_flush(ds_srv *s, ds_conn *c)
{
	while (c->out_off < c->out_len) {
		size_t end = c->out_len;
		ssize_t w;
		if (c->fd_at >= 0 && (size_t)c->fd_at == c->out_off) {
			int fds[2];
			ds_ring_writer_fds(c->ring, &fds[0], &fds[1]);
			w = ds_ipc_send_fds(c->fd, c->out + c->out_off, end - c->out_off, fds, 2);
			if (w > 0)
				c->fd_at = -1;
			else if (w < 0)
				errno = (int)-w;
		} else {
			if (c->fd_at >= 0 && (size_t)c->fd_at > c->out_off)
				end = (size_t)c->fd_at;
			w = send(c->fd, c->out + c->out_off, end - c->out_off, MSG_NOSIGNAL);
		}
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			if (errno == EINTR)
				continue;
			conn_close(s, c);
			return -1;
		}
		c->out_off += (size_t)w;
		out_sent(s, c, (size_t)w);
	}
	if (c->out_off == c->out_len) {
		c->out_off = c->out_len = 0;
		if (c->closing) {
			conn_close(s, c);
			return -1;
		}
	}
	conn_update_events(s, c);
	return 0;
}

static int conn_append(ds_conn *c, const void *buf, size_t len)
{
	if (c->out_off && c->out_off == c->out_len)
		c->out_off = c->out_len = 0;
	if (c->out_len + len > c->out_cap) {
		if (c->out_off) { /* compact before growing */
			memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
			c->out_len -= c->out_off;
			if (c->fd_at >= 0)
				c->fd_at -= (long)c->out_off;
			c->out_off = 0;
		}
		if (c->out_len + len > c->out_cap) {
			size_t cap = (c->out_len + len) * 2;
			uint8_t *o = realloc(c->out, cap);
			if (!o)
				return -ENOMEM;
			c->out = o;
			c->out_cap = cap;
		}
	}
	memcpy(c->out + c->out_len, buf, len);
	c->out_len += len;
	return 0;
}

void ds_srv_send(ds_srv *s, ds_conn *c, msgpack_sbuffer *sb, const int *fds, int nfds)
{
	if (c->fd >= 0) {
		if (conn_append(c, sb->data, sb->size) == 0) {
			if (nfds) /* the fds travel with the first byte of this message */
				c->fd_at = (long)(c->out_len - sb->size);
			atomic_fetch_add(&c->out_bytes, (long)sb->size);
			conn_flush(s, c);
		}
	}
	msgpack_sbuffer_destroy(sb);
}

void ds_srv_error(ds_srv *s, ds_conn *c, uint32_t msgid, int code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	if (msgid == UINT32_MAX) { /* no msgid to answer: a notification */
		ds_ipc_pack_notify_head(&pk, "error");
		msgpack_pack_array(&pk, 2);
		msgpack_pack_int(&pk, code);
		ds_mp_pack_str(&pk, msg);
	} else {
		ds_ipc_pack_error(&pk, msgid, code, msg);
	}
	ds_srv_send(s, c, &sb, NULL, 0);
}

/* Protocol error: answer, then close once it is sent. */
static void conn_fatal(ds_srv *s, ds_conn *c, uint32_t msgid, int code, const char *why)
{
	s->protocol_errors++;
	ds_log(DS_LOG_INFO, "client %llu (pid %d): protocol error: %s", (unsigned long long)c->id, (int)c->pid, why);
	ds_srv_error(s, c, msgid, code, "%s", why);
	if (c->fd >= 0) {
		c->closing = 1;
		conn_flush(s, c);
	}
}

static void conn_read(ds_srv *s, ds_conn *c)
{
	for (int rounds = 0; rounds < 16 && c->fd >= 0 && !c->closing; rounds++) {
		if (c->in_cap - c->in_len < READ_CHUNK) {
			size_t cap = c->in_cap ? c->in_cap * 2 : READ_CHUNK * 2;
			size_t maxcap = (size_t)s->conf.max_message_bytes + READ_CHUNK * 2;
			if (cap > maxcap)
				cap = maxcap;
			if (cap > c->in_cap) {
				uint8_t *n = realloc(c->in, cap);
				if (!n) {
					conn_close(s, c);
					return;
				}
				c->in = n;
				c->in_cap = cap;
			}
		}
		size_t room = c->in_cap - c->in_len;
		if (!room)
			break;
		ssize_t r = recv(c->fd, c->in + c->in_len, room, 0);
		if (r == 0) {
			conn_close(s, c);
			return;
		}
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				conn_close(s, c);
			return;
		}
		c->in_len += (size_t)r;
		/* every complete message in the buffer */
		while (c->fd >= 0 && !c->closing) {
			int sc = ds_prescan_feed(&c->ps, c->in, c->in_len);
			if (sc == 0)
				break;
			if (sc < 0) {
				conn_fatal(s, c, UINT32_MAX, sc == -EMSGSIZE ? DS_E_TOO_LARGE : DS_E_PARSE,
					   sc == -EMSGSIZE ? "message larger than limits.max_message_bytes"
							   : "malformed msgpack (a count exceeds the bytes left, nesting too deep, or byte 0xc1)");
				return;
			}
			size_t len = c->ps.pos;
			ds_ipc_msg m;
			uint32_t msgid;
			const char *why = NULL;
			int rc = ds_ipc_decode(c->in, len, &m, &msgid, &why);
			if (rc) {
				/* the frame was whole: a bad shape is answered, the stream goes on */
				s->protocol_errors++;
				ds_srv_error(s, c, msgid, DS_E_INVALID_REQUEST, "%s", why);
			} else {
				ds_srv_dispatch(s, c, &m);
			}
			ds_ipc_msg_clear(&m);
			if (c->fd < 0)
				return;
			memmove(c->in, c->in + len, c->in_len - len);
			c->in_len -= len;
			ds_prescan_init(&c->ps, (size_t)s->conf.max_message_bytes, DS_IPC_MAX_DEPTH);
		}
	}
}

static void do_accept(ds_srv *s)
{
	for (;;) {
		int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				ds_log(DS_LOG_WARNING, "accept: %s", strerror(errno));
			return;
		}
		struct ucred cr;
		socklen_t cl = sizeof(cr);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0) {
			close(fd);
			continue;
		}
		const char *refuse = NULL;
		int code = DS_E_PERMISSION;
		if (!allowed(s, cr.uid, cr.gid)) {
			refuse = "this user is not in server.allow_users / server.allow_groups";
			ds_log(DS_LOG_NOTICE, "refused uid %d gid %d pid %d: not in the allow-list", (int)cr.uid,
			       (int)cr.gid, (int)cr.pid);
		} else if (s->n_conns >= s->conf.max_clients) {
			refuse = "too many clients (limits.max_clients)";
			code = DS_E_LIMIT;
		} else if (s->stopping) {
			refuse = "the server is shutting down";
			code = DS_E_UNAVAILABLE;
		}
		if (refuse) {
			msgpack_sbuffer sb;
			msgpack_packer pk;
			msgpack_sbuffer_init(&sb);
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			ds_ipc_pack_notify_head(&pk, "error");
			msgpack_pack_array(&pk, 2);
			msgpack_pack_int(&pk, code);
			ds_mp_pack_str(&pk, refuse);
			ssize_t w = send(fd, sb.data, sb.size, MSG_NOSIGNAL | MSG_DONTWAIT);
			(void)w;
			msgpack_sbuffer_destroy(&sb);
			close(fd);
			s->rejected++;
			continue;
		}
		ds_conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		atomic_init(&c->refs, 1);
		c->fd = fd;
		c->id = ++s->next_conn_id;
		c->uid = cr.uid;
		c->gid = cr.gid;
		c->pid = cr.pid;
		c->fd_at = -1;
		ds_prescan_init(&c->ps, (size_t)s->conf.max_message_bytes, DS_IPC_MAX_DEPTH);
		struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
		if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			ds_conn_unref(c);
			continue;
		}
		c->next = s->conns;
		s->conns = c;
		s->n_conns++;
		s->connections++;
		ds_log(DS_LOG_DEBUG, "client %llu connected: uid %d gid %d pid %d", (unsigned long long)c->id,
		       (int)cr.uid, (int)cr.gid, (int)cr.pid);
	}
}

static void live_remove(ds_srv *s, uint64_t id)
{
	for (int i = 0; i < s->n_live; i++)
		if (s->live[i].id == id) {
			s->live[i] = s->live[--s->n_live];
			return;
		}
}

static void do_outbox(ds_srv *s)
{
	uint64_t v;
	ssize_t r = read(s->outefd, &v, sizeof(v));
	(void)r;
	for (ds_out_msg *m = ds_batcher_take(s->b), *nx; m; m = nx) {
		nx = m->next;
		ds_conn *c = m->conn;
		switch (m->kind) {
		case DS_OUT_BYTES:
			if (c->fd >= 0 && conn_append(c, m->buf, m->len) == 0)
				conn_flush(s, c);
			else
				out_sent(s, c, m->len);
			break;
		case DS_OUT_DONE:
			live_remove(s, m->req_id);
			c->n_requests--;
			break;
		case DS_OUT_CLOSE:
			conn_close(s, c);
			break;
		}
		ds_out_msg_free(m);
	}
}

/* ---- lifecycle ---- */

static int open_socket(ds_srv *s, ds_err *e)
{
	int n = sd_listen_fds(1);
	if (n > 1)
		return ds_errf(e, -EINVAL, "systemd passed %d sockets; dsd takes one", n);
	if (n == 1) {
		if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
			return ds_errf(e, -EINVAL, "the socket systemd passed is not a listening UNIX stream socket");
		s->lfd = SD_LISTEN_FDS_START;
		fcntl(s->lfd, F_SETFL, fcntl(s->lfd, F_GETFL) | O_NONBLOCK);
		fcntl(s->lfd, F_SETFD, FD_CLOEXEC);
		snprintf(s->sock_path, sizeof(s->sock_path), "(socket activation)");
		return 0;
	}
	char path[DS_CONF_STR];
	default_socket(&s->conf, path, sizeof(path));
	if (!path[0])
		return ds_errf(e, -EINVAL, "no socket path: XDG_RUNTIME_DIR is unset; pass --socket PATH");
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(a.sun_path))
		return ds_errf(e, -ENAMETOOLONG, "socket path '%s' is longer than %zu bytes", path, sizeof(a.sun_path) - 1);
	strcpy(a.sun_path, path);
	if (!strcmp(path, "/run/dsd/dsd.sock"))
		mkdir("/run/dsd", 0755);
	s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->lfd < 0)
		return ds_errf(e, -errno, "socket: %s", strerror(errno));
	/* A socket file left by a dead daemon is replaced; a live one is not. */
	int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0) {
		close(probe);
		return ds_errf(e, -EADDRINUSE, "another dsd is listening on %s", path);
	}
	if (probe >= 0)
		close(probe);
	unlink(path);
	mode_t old = umask(0177);
	int rc = bind(s->lfd, (struct sockaddr *)&a, sizeof(a));
	umask(old);
	if (rc < 0)
		return ds_errf(e, -errno, "bind %s: %s", path, strerror(errno));
	if (chmod(path, (mode_t)s->conf.socket_mode) < 0)
		return ds_errf(e, -errno, "chmod %s: %s", path, strerror(errno));
	if (listen(s->lfd, 128) < 0)
		return ds_errf(e, -errno, "listen %s: %s", path, strerror(errno));
	snprintf(s->sock_path, sizeof(s->sock_path), "%s", path);
	s->own_socket = 1;
	return 0;
}

/* The engine (the weights onto the backend: the slow part of a start) is
 * created on a thread of its own while the event loop already answers
 * hello/status (state "loading", with progress) and queues requests in the
 * batcher's inbox. Meanwhile sd_notify gets STATUS= with bytes, total and
 * rate, and EXTEND_TIMEOUT_USEC= so that systemd's start timeout does not
 * kill a long load that is making progress. */
struct ds_loader {
	pthread_t th, nt;
	int has_nt;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done, rc;
	ds_srv *s;
	ds_engine_config ec;
	const char *want;
	ds_err e;
	double t0;
	ds_wload_progress prog;
};

static void *loader_run(void *arg)
{
	ds_loader *l = arg;
	ds_srv *s = l->s;
	l->ec.load_progress = &l->prog;
	/* tests: a load slow enough to watch (tests/integration/serve.sh) */
	const char *delay = getenv("DSD_TEST_LOAD_DELAY_MS");
	if (delay && atoi(delay) > 0) {
		struct timespec ts = { atoi(delay) / 1000, (long)(atoi(delay) % 1000) * 1000000L };
		nanosleep(&ts, NULL);
	}
	int rc = ds_engine_create(s->m, &l->ec, &s->eng, &l->e);
	if (rc && !strcmp(l->want, "auto")) {
		ds_log(DS_LOG_NOTICE, "backend auto: no usable CUDA backend (%s); using the CPU", l->e.msg);
		l->ec.backend = "cpu";
		memset(&l->e, 0, sizeof(l->e));
		rc = ds_engine_create(s->m, &l->ec, &s->eng, &l->e);
	}
	pthread_mutex_lock(&l->mu);
	l->rc = rc;
	l->done = 1;
	pthread_cond_broadcast(&l->cv);
	pthread_mutex_unlock(&l->mu);
	uint64_t one = 1;
	ssize_t w = write(s->loadefd, &one, sizeof(one));
	(void)w;
	return NULL;
}

/* STATUS= lines while loading, once a second, until the loader is done. */
static void *loader_notify(void *arg)
{
	ds_loader *l = arg;
	pthread_mutex_lock(&l->mu);
	while (!l->done) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&l->cv, &l->mu, &ts);
		if (l->done)
			break;
		ds_wload_snapshot sn;
		ds_wload_progress_read(&l->prog, &sn);
		if (sn.total)
			sd_notifyf(0, "STATUS=loading %s: %.1f of %.1f GB (%.0f%%), %.2f GB/s\nEXTEND_TIMEOUT_USEC=30000000",
				   l->s->conf.model, sn.done / 1e9, sn.total / 1e9, 100.0 * (double)sn.done / (double)sn.total,
				   sn.bytes_per_s / 1e9);
		else
			sd_notifyf(0, "STATUS=loading %s\nEXTEND_TIMEOUT_USEC=30000000", l->s->conf.model);
	}
	pthread_mutex_unlock(&l->mu);
	return NULL;
}

int ds_srv_load_snapshot(ds_srv *s, ds_wload_snapshot *sn)
{
	memset(sn, 0, sizeof(*sn));
	if (!s->loader)
		return 0;
	ds_wload_progress_read(&s->loader->prog, sn);
	return 1;
}

/* The fast part, before the socket opens: the model's config and tensor
 * index (mapped, not read) and the tokenizer, so that requests can be
 * validated and tokenized while the weights load. */
static int open_model(ds_srv *s, ds_err *e)
{
	struct stat st;
	if (stat(s->conf.model, &st) || !S_ISDIR(st.st_mode))
		return ds_errf(e, -ENOENT,
			       "model directory '%s' not found (set [model] path in %s or pass --model DIR; "
			       "the default model is built by the tiny-model training script)",
			       s->conf.model, s->conf_path);
	sd_notifyf(0, "STATUS=loading %s", s->conf.model);
	int rc = ds_model_open(s->conf.model, 0, &s->m, e);
	if (rc)
		return rc;
	char tj[DS_CONF_STR + 32];
	snprintf(tj, sizeof(tj), "%s/tokenizer.json", s->conf.model);
	if (access(tj, F_OK) == 0) {
		rc = ds_tok_load_dir(s->conf.model, &s->tok, e);
		if (rc)
			return rc;
	} else {
		ds_log(DS_LOG_NOTICE, "%s has no tokenizer.json: serving token ids only", s->conf.model);
	}
	return 0;
}

static int start_loader(ds_srv *s, ds_err *e)
{
	ds_loader *l = calloc(1, sizeof(*l));
	if (!l)
		return ds_errf(e, -ENOMEM, "out of memory");
	pthread_mutex_init(&l->mu, NULL);
	pthread_cond_init(&l->cv, NULL);
	l->s = s;
	l->t0 = s->t_start;
	ds_engine_config_default(&l->ec);
	l->ec.threads = (int)s->conf.threads;
	l->ec.block_tokens = (int)s->conf.block_tokens;
	l->ec.kv_bytes = (size_t)s->conf.kv_bytes;
	l->ec.device = (int)s->conf.device;
	l->ec.gpu_kv_fraction = s->conf.gpu_kv_fraction;
	l->want = s->conf.backend;
	l->ec.backend = !strcmp(l->want, "auto") ? "cuda" : l->want;
	l->ec.uring_load = (int)s->conf.uring_load;
	l->ec.eager = !s->conf.cuda_graphs;
	s->loader = l;
	int rc = pthread_create(&l->th, NULL, loader_run, l);
	if (rc) {
		s->loader = NULL;
		free(l);
		return ds_errf(e, -rc, "cannot start the loading thread: %s", strerror(rc));
	}
	l->has_nt = pthread_create(&l->nt, NULL, loader_notify, l) == 0;
	return 0;
}

/* The loader thread ended (its eventfd fired, or the daemon stops): joins it.
 * Returns its result; on success the batcher starts and systemd hears READY. */
static int finish_load(ds_srv *s)
{
	ds_loader *l = s->loader;
	if (!l)
		return 0;
	uint64_t v;
	ssize_t r = read(s->loadefd, &v, sizeof(v));
	(void)r;
	pthread_join(l->th, NULL);
	if (l->has_nt)
		pthread_join(l->nt, NULL); /* done is set and broadcast: it returns at once */
	int rc = l->rc;
	ds_err e = l->e;
	s->loader = NULL;
	pthread_mutex_destroy(&l->mu);
	pthread_cond_destroy(&l->cv);
	free(l);
	if (rc) {
		ds_log(DS_LOG_ERR, "%s", e.msg[0] ? e.msg : strerror(-rc));
		sd_notifyf(0, "STATUS=cannot load the model: %s", e.msg[0] ? e.msg : strerror(-rc));
		return rc;
	}
	s->backend = ds_engine_backend_name(s->eng);
	const ds_wload_result *lr = ds_engine_load_result(s->eng);
	if (lr->tensor_bytes) {
		s->load_bytes = lr->tensor_bytes;
		s->load_uring = lr->io_uring ? 1 : 2;
		s->load_direct = !lr->buffered_shards;
		ds_log(DS_LOG_INFO, "streamed %.2f GB of weights in %.2f s (%.2f GB/s, %s%s)", lr->tensor_bytes / 1e9,
		       lr->seconds, lr->seconds > 0 ? lr->tensor_bytes / 1e9 / lr->seconds : 0.0,
		       lr->io_uring ? "io_uring" : "pread: io_uring unavailable",
		       lr->buffered_shards ? (lr->direct_refused ? ", buffered: O_DIRECT refused" : ", buffered")
					   : ", O_DIRECT");
	}
	s->load_s = ds_now() - s->t_start;
	ds_batcher_cfg bc = {
		.max_batch = (int)s->conf.max_batch, .step_tokens = (int)s->conf.step_tokens,
		.uid_max_running = (int)s->conf.uid_max_running, .sock_budget = SOCK_BUDGET,
		.prefix_cache = (int)s->conf.prefix_cache, .mtp_depth = (int)s->conf.mtp_depth,
		.mtp_chain = (int)s->conf.mtp_chain,
		.mtp_max_batch = s->conf.mtp_max_batch >= 0 ? (int)s->conf.mtp_max_batch
			       : !strcmp(s->backend, "cuda") ? DS_MTP_MAX_BATCH_CUDA : DS_MTP_MAX_BATCH_CPU,
	};
	if ((rc = ds_batcher_start(s->b, s->eng, s->tok, &bc, &e))) {
		ds_log(DS_LOG_ERR, "%s", e.msg);
		sd_notifyf(0, "STATUS=%s", e.msg);
		return rc;
	}
	s->loaded = 1;
	ds_log(DS_LOG_INFO, "serving %s (%s, %d layers, vocab %d%s) on %s; loaded in %.2f s", s->conf.model, s->backend,
	       s->m->cfg.num_hidden_layers, s->m->cfg.vocab_size, s->tok ? ", tokenizer" : ", token ids only",
	       s->sock_path, s->load_s);
	sd_notifyf(0, "READY=1\nSTATUS=serving %s on %s", s->conf.model, s->sock_path);
	return 0;
}

static void reload(ds_srv *s)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading %s",
		   (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000, s->conf_path);
	ds_conf nc;
	ds_err e = { { 0 } };
	int rc = load_conf(s, &nc, &e);
	ds_srv tmp = *s;
	if (!rc)
		rc = resolve_allow(&tmp, &nc, &e);
	if (rc) {
		ds_log(DS_LOG_ERR, "reload: %s; keeping the running configuration", e.msg);
	} else {
		char list[512];
		if (ds_conf_diff(&s->conf, &nc, 1, list, sizeof(list)))
			ds_log(DS_LOG_WARNING, "reload: changed settings that need a restart (kept as they are): %s", list);
		/* keep what needs a restart, take the rest */
		size_t n;
		const ds_conf_key *k = ds_conf_keys(&n);
		for (size_t i = 0; i < n; i++)
			if (!k[i].reloadable)
				memcpy((char *)&nc + k[i].offset, (const char *)&s->conf + k[i].offset, k[i].size);
		if (ds_conf_diff(&s->conf, &nc, 0, list, sizeof(list)))
			ds_log(DS_LOG_INFO, "reload: applied %s", list);
		else
			ds_log(DS_LOG_INFO, "reload: nothing changed");
		s->conf = nc;
		memcpy(s->allow_uid, tmp.allow_uid, sizeof(s->allow_uid));
		memcpy(s->allow_gid, tmp.allow_gid, sizeof(s->allow_gid));
		s->n_allow_uid = tmp.n_allow_uid;
		s->n_allow_gid = tmp.n_allow_gid;
		ds_log_set_level((int)s->conf.log_level);
	}
	sd_notifyf(0, "READY=1\nSTATUS=serving on %s", s->sock_path);
}

static void begin_stop(ds_srv *s)
{
	s->stopping = 1;
	sd_notify(0, "STOPPING=1\nSTATUS=stopping: finishing running requests");
	ds_log(DS_LOG_INFO, "stopping: %d requests running; deadline %.0f s", s->n_live, s->conf.shutdown_timeout);
	if (s->lfd >= 0) {
		epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->lfd, NULL);
		close(s->lfd);
		s->lfd = -1;
		if (s->own_socket)
			unlink(s->sock_path);
	}
	struct itimerspec it = { 0 };
	it.it_value.tv_sec = (time_t)s->conf.shutdown_timeout;
	it.it_value.tv_nsec = (long)((s->conf.shutdown_timeout - (double)it.it_value.tv_sec) * 1e9);
	if (!it.it_value.tv_sec && !it.it_value.tv_nsec)
		it.it_value.tv_nsec = 1;
	timerfd_settime(s->tfd, 0, &it, NULL);
}

static void on_deadline(ds_srv *s)
{
	uint64_t v;
	ssize_t r = read(s->tfd, &v, sizeof(v));
	(void)r;
	if (s->stopping == 1) {
		ds_log(DS_LOG_NOTICE, "shutdown deadline: cancelling %d requests", s->n_live);
		ds_batcher_cancel_all(s->b);
		s->stopping = 2;
		struct itimerspec it = { .it_value = { .tv_sec = 5 } }; /* cancellation finishes within a step */
		timerfd_settime(s->tfd, 0, &it, NULL);
	} else {
		ds_log(DS_LOG_WARNING, "requests did not finish after cancellation; exiting anyway");
		s->stopping = 3;
	}
}

static void bury(ds_srv *s)
{
	while (s->dead) {
		ds_conn *c = s->dead;
		s->dead = c->next;
		ds_conn_unref(c);
	}
}

static int serve_loop(ds_srv *s)
{
	struct epoll_event evs[64];
	for (;;) {
		if (s->stopping && (s->n_live == 0 || s->stopping == 3))
			break;
		int n = epoll_wait(s->epfd, evs, 64, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ds_log(DS_LOG_ERR, "epoll_wait: %s", strerror(errno));
			return 1;
		}
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			uint32_t ev = evs[i].events;
			if (p == &s->lfd) {
				if (s->lfd >= 0)
					do_accept(s);
			} else if (p == &s->outefd) {
				do_outbox(s);
			} else if (p == &s->tfd) {
				on_deadline(s);
			} else if (p == &s->loadefd) {
				if (finish_load(s)) {
					s->stopping = 3; /* nothing to serve: exit 1 */
					return 1;
				}
			} else if (p == &s->sigfd) {
				struct signalfd_siginfo si;
				while (read(s->sigfd, &si, sizeof(si)) == sizeof(si)) {
					if (si.ssi_signo == SIGHUP) {
						reload(s);
					} else if (!s->stopping) {
						begin_stop(s);
					} else if (s->stopping == 1) {
						ds_log(DS_LOG_NOTICE, "second stop signal: cancelling");
						struct itimerspec it = { .it_value = { .tv_nsec = 1 } };
						timerfd_settime(s->tfd, 0, &it, NULL);
					}
				}
			} else {
				ds_conn *c = p;
				/* the outbox may have closed it in this same batch: conn_close
				 * left fd -1, and its memory lives while the epoll entry did */
				if (c->fd < 0)
					continue;
				if (ev & EPOLLOUT)
					if (conn_flush(s, c))
						continue;
				if (ev & EPOLLIN)
					conn_read(s, c);
				if (c->fd >= 0 && (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
					conn_close(s, c);
			}
		}
		bury(s);
	}
	return 0;
}

int ds_cmd_serve(int argc, char **argv)
{
	ds_srv s = { 0 };
	s.lfd = s.epfd = s.sigfd = s.outefd = s.tfd = s.loadefd = -1;
	s.t_start = ds_now();
	int rc = parse_args(&s, argc, argv, "serve");
	if (rc) {
		free_flags(&s);
		return rc < 0 ? 0 : rc;
	}
	ds_err e = { { 0 } };
	int ret = 1;
	if (load_conf(&s, &s.conf, &e) || resolve_allow(&s, &s.conf, &e)) {
		ds_log(DS_LOG_ERR, "configuration: %s", e.msg);
		sd_notifyf(0, "STATUS=configuration error: %s", e.msg);
		free_flags(&s);
		return 1;
	}
	ds_log_set_level((int)s.conf.log_level);
	/* signals are read from a signalfd; the engine thread inherits the mask */
	sigset_t ss;
	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	sigaddset(&ss, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &ss, NULL);
	signal(SIGPIPE, SIG_IGN);
	s.sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
	s.epfd = epoll_create1(EPOLL_CLOEXEC);
	s.outefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	s.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	s.loadefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (s.sigfd < 0 || s.epfd < 0 || s.outefd < 0 || s.tfd < 0 || s.loadefd < 0) {
		ds_log(DS_LOG_ERR, "cannot set up the event loop: %s", strerror(errno));
		goto out;
	}
	if (open_model(&s, &e)) {
		ds_log(DS_LOG_ERR, "%s", e.msg);
		sd_notifyf(0, "STATUS=cannot load the model: %s", e.msg);
		goto out;
	}
	if (ds_batcher_new(s.outefd, &s.b)) {
		ds_log(DS_LOG_ERR, "out of memory");
		goto out;
	}
	if (open_socket(&s, &e)) {
		ds_log(DS_LOG_ERR, "%s", e.msg);
		sd_notifyf(0, "STATUS=%s", e.msg);
		goto out;
	}
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.ptr = &s.lfd;
	epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.lfd, &ev);
	ev.data.ptr = &s.outefd;
	epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.outefd, &ev);
	ev.data.ptr = &s.sigfd;
	epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.sigfd, &ev);
	ev.data.ptr = &s.tfd;
	epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.tfd, &ev);
	ev.data.ptr = &s.loadefd;
	epoll_ctl(s.epfd, EPOLL_CTL_ADD, s.loadefd, &ev);
	if (start_loader(&s, &e)) {
		ds_log(DS_LOG_ERR, "%s", e.msg);
		goto out;
	}
	ds_log(DS_LOG_INFO, "loading %s on %s; listening on %s", s.conf.model, s.conf.backend, s.sock_path);
	ret = serve_loop(&s);
	ds_log(DS_LOG_INFO, "stopped");
out:
	if (s.loader) /* stopped while loading: the weights finish loading first */
		finish_load(&s);
	while (s.conns) {
		conn_flush(&s, s.conns); /* last answers, best effort */
		if (s.conns)
			conn_close(&s, s.conns);
	}
	s.b = ds_batcher_stop(s.b);
	bury(&s);
	if (s.lfd >= 0) {
		close(s.lfd);
		if (s.own_socket)
			unlink(s.sock_path);
	}
	free(s.live);
	ds_tok_free(s.tok);
	ds_engine_free(s.eng);
	ds_model_free(s.m);
	int fds[] = { s.epfd, s.sigfd, s.outefd, s.tfd, s.loadefd };
	for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free_flags(&s);
	return ret;
}
