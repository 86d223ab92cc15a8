/* serve_driver — drives a running dsd for tests/integration/serve.sh through
 * libdsclient and raw sockets. Usage: serve_driver SOCKET MODE [ARGS].
 * Prints one line per check ("ok ..." / "FAIL ...") and exits 1 on any failure. */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client-lib/dsclient.h"
#include "ipc/prescan.h"
#include "ipc/proto.h"

static const char *sock;
static int failures;

#define CHECK(cond, ...) do { if (cond) { printf("ok   "); } else { printf("FAIL "); failures++; } \
	printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

static int parse_csv(const char *s, int32_t *out, int max)
{
	int n = 0;
	while (*s && n < max) {
		char *end;
		long v = strtol(s, &end, 10);
		if (end == s)
			break;
		out[n++] = (int32_t)v;
		s = end;
		while (*s == ',' || *s == ' ')
			s++;
	}
	return n;
}

/* Collects one request's tokens; returns the finish reason or -errno. */
static int collect(ds_client *c, uint64_t id, int32_t *toks, int max, int *n, ds_gen_stats *st)
{
	*n = 0;
	for (;;) {
		ds_event ev;
		int rc = ds_client_next_event(c, 20000, &ev);
		if (rc)
			return rc;
		if (ev.request_id != id)
			continue;
		if (ev.final) {
			if (st)
				*st = ev.stats;
			return ev.finish;
		}
		if ((uint32_t)*n != ev.seq)
			return -EPROTO;
		if (*n < max)
			toks[*n] = ev.token;
		(*n)++;
	}
}

/* ---- concurrent ---- */

typedef struct job {
	int index;
	uint64_t seed;
	float temp, rep;
	int32_t prompt[64], expect[512];
	int n_prompt, n_expect, max_tokens;
	int ok;
	char why[128];
} job;

static void *run_job(void *arg)
{
	job *j = arg;
	ds_client *c;
	ds_client_opts o = { .name = "serve_driver", .no_ring = j->index & 1 };
	int rc = ds_client_connect(sock, &o, &c);
	if (rc) {
		snprintf(j->why, sizeof(j->why), "connect: %s", strerror(-rc));
		return NULL;
	}
	ds_gen_params p;
	ds_gen_params_init(&p);
	p.ids = j->prompt;
	p.n_ids = (size_t)j->n_prompt;
	p.max_tokens = j->max_tokens;
	p.temperature = j->temp;
	if (j->rep != 1)
		p.repetition_penalty = j->rep;
	p.seed = j->seed;
	p.has_seed = 1;
	/* sampled streams are compared with dsd generate --no-mtp: whether a step
	 * drafts depends on the batch, and drafting consumes the RNG differently */
	p.no_mtp = 1;
	uint64_t id;
	rc = ds_client_generate(c, &p, &id);
	if (rc) {
		snprintf(j->why, sizeof(j->why), "generate: %s (%s)", strerror(-rc), ds_client_last_error(c));
		ds_client_free(c);
		return NULL;
	}
	int32_t got[512];
	int n;
	rc = collect(c, id, got, 512, &n, NULL);
	ds_client_free(c);
	if (rc < 0) {
		snprintf(j->why, sizeof(j->why), "stream: %s", strerror(-rc));
		return NULL;
	}
	if (n != j->n_expect || memcmp(got, j->expect, sizeof(int32_t) * (size_t)n)) {
		snprintf(j->why, sizeof(j->why), "got %d tokens (first %d), expected %d (first %d)", n, n ? got[0] : -1,
			 j->n_expect, j->n_expect ? j->expect[0] : -1);
		return NULL;
	}
	j->ok = 1;
	return NULL;
}

/* cases file: lines "seed temperature repetition_penalty max_tokens prompt_csv expected_csv" */
static void mode_concurrent(int nthreads, const char *cases)
{
	FILE *f = fopen(cases, "r");
	if (!f) {
		CHECK(0, "open %s", cases);
		return;
	}
	job proto[16];
	int np = 0;
	char a[4096], b[4096];
	unsigned long long seed;
	float t, rp;
	int mt;
	while (np < 16 && fscanf(f, "%llu %f %f %d %4095s %4095s", &seed, &t, &rp, &mt, a, b) == 6) {
		memset(&proto[np], 0, sizeof(job));
		proto[np].seed = seed;
		proto[np].temp = t;
		proto[np].rep = rp;
		proto[np].max_tokens = mt;
		proto[np].n_prompt = parse_csv(a, proto[np].prompt, 64);
		proto[np].n_expect = parse_csv(b, proto[np].expect, 512);
		np++;
	}
	fclose(f);
	if (!np) {
		CHECK(0, "no cases in %s", cases);
		return;
	}
	job *jobs = calloc((size_t)nthreads, sizeof(job));
	pthread_t *th = calloc((size_t)nthreads, sizeof(pthread_t));
	for (int i = 0; i < nthreads; i++) {
		jobs[i] = proto[i % np];
		jobs[i].index = i;
		pthread_create(&th[i], NULL, run_job, &jobs[i]);
	}
	int ok = 0;
	for (int i = 0; i < nthreads; i++) {
		pthread_join(th[i], NULL);
		if (!jobs[i].ok)
			printf("     client %d: %s\n", i, jobs[i].why);
		ok += jobs[i].ok;
	}
	CHECK(ok == nthreads, "%d concurrent clients (ring and socket) got the offline streams: %d/%d", nthreads, ok,
	      nthreads);
	free(jobs);
	free(th);
}

/* ---- stats polling ---- */

static int json_int(const char *json, const char *key)
{
	char pat[64];
	snprintf(pat, sizeof(pat), "\"%s\":", key);
	const char *p = strstr(json, pat);
	return p ? atoi(p + strlen(pat)) : -1;
}

/* Waits until the daemon reports no live requests and no KV blocks in use. */
static int wait_idle(ds_client *c, int ms, int *live, int *blocks)
{
	for (int t = 0; t < ms; t += 20) {
		char *js;
		if (ds_client_call_json(c, "stats", &js))
			return 0;
		*live = json_int(js, "live");
		*blocks = json_int(js, "blocks_used");
		free(js);
		if (*live == 0 && *blocks == 0)
			return 1;
		usleep(20000);
	}
	return 0;
}

static ds_client *conn(int no_ring)
{
	ds_client *c = NULL;
	ds_client_opts o = { .name = "serve_driver", .no_ring = no_ring };
	int rc = ds_client_connect(sock, &o, &c);
	if (rc)
		CHECK(0, "connect %s: %s", sock, strerror(-rc));
	return c;
}

static uint64_t start_long(ds_client *c, int max_tokens)
{
	static const int32_t ids[] = { 11, 12, 13, 14, 15 };
	ds_gen_params p;
	ds_gen_params_init(&p);
	p.ids = ids;
	p.n_ids = 5;
	p.max_tokens = max_tokens;
	p.ignore_eos = 1;
	uint64_t id = 0;
	int rc = ds_client_generate(c, &p, &id);
	if (rc)
		CHECK(0, "generate: %s (%s)", strerror(-rc), ds_client_last_error(c));
	return id;
}

static void mode_cancel(void)
{
	ds_client *c = conn(0);
	if (!c)
		return;
	uint64_t id = start_long(c, 500);
	ds_event ev;
	int n = 0, rc = 0;
	while (n < 3 && (rc = ds_client_next_event(c, 10000, &ev)) == 0)
		n++;
	int crc = ds_client_cancel(c, id);
	CHECK(crc == 0, "cancel accepted (%s)", crc ? strerror(-crc) : "0");
	int finish = -1, tokens = n;
	while ((rc = ds_client_next_event(c, 10000, &ev)) == 0) {
		if (ev.final) {
			finish = ev.finish;
			break;
		}
		tokens++;
	}
	CHECK(finish == DS_CLIENT_FINISH_CANCELLED && tokens < 500, "cancelled after %d of 500 tokens (finish %d)",
	      tokens, finish);
	int live, blocks;
	CHECK(wait_idle(c, 3000, &live, &blocks), "after cancel: %d live requests, %d KV blocks used", live, blocks);
	CHECK(ds_client_cancel(c, id) == -ENOENT, "cancelling it again: not found");
	ds_client_free(c);
}

static void mode_disconnect(void)
{
	for (int variant = 0; variant < 2; variant++) {
		pid_t pid = fork();
		if (pid == 0) {
			ds_client *c = conn(variant);
			if (!c)
				_exit(2);
			start_long(c, 500);
			ds_event ev;
			for (int n = 0; n < 2;)
				if (ds_client_next_event(c, 10000, &ev) == 0)
					n++;
			_exit(0); /* no goodbye: the kernel closes the socket */
		}
		int st;
		waitpid(pid, &st, 0);
		ds_client *c = conn(1);
		if (!c)
			return;
		int live, blocks;
		CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0 && wait_idle(c, 3000, &live, &blocks),
		      "client (%s) gone mid-stream: %d live requests, %d KV blocks used", variant ? "socket" : "ring",
		      live, blocks);
		ds_client_free(c);
	}
}

/* Run with a daemon whose rings are 4 KiB: a client that does not read
 * pauses only its own stream. */
static void mode_slowreader(void)
{
	ds_client *a = conn(0), *b = conn(0);
	if (!a || !b)
		return;
	uint64_t ida = start_long(a, 400);
	usleep(300000);
	static const int32_t ids[] = { 3, 4, 5 };
	ds_gen_params p;
	ds_gen_params_init(&p);
	p.ids = ids;
	p.n_ids = 3;
	p.max_tokens = 40;
	p.ignore_eos = 1;
	uint64_t idb;
	int rc = ds_client_generate(b, &p, &idb);
	int32_t toks[64];
	int n = 0;
	if (!rc)
		rc = collect(b, idb, toks, 64, &n, NULL);
	CHECK(rc == DS_CLIENT_FINISH_LENGTH && n == 40, "the other client finished its 40 tokens meanwhile (%d)", n);
	char *js = NULL;
	int paused = 0;
	for (int t = 0; t < 100 && !paused; t++) {
		free(js);
		js = NULL;
		if (ds_client_call_json(b, "ps", &js))
			break;
		paused = strstr(js, "\"paused\"") != NULL;
		if (!paused)
			usleep(20000);
	}
	free(js);
	CHECK(paused, "the stalled reader's request shows as paused in ps");
	int32_t all[512];
	ds_gen_stats st;
	rc = collect(a, ida, all, 512, &n, &st);
	CHECK(rc == DS_CLIENT_FINISH_LENGTH && n == 400 && st.generated_tokens == 400,
	      "the stalled reader then received all 400 tokens in order (%d, finish %d)", n, rc);
	ds_client_free(a);
	ds_client_free(b);
}

/* ---- hostile bytes over a raw socket ---- */

static int raw_connect(void)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Reads one message; returns its error code (0 = a result, -1 = closed or
 * nothing within 3 s). For notifications ("error") the code inside. */
static int raw_reply(int fd, char *msg, size_t msgcap)
{
	static uint8_t buf[1 << 16];
	size_t len = 0;
	ds_prescan ps;
	ds_prescan_init(&ps, sizeof(buf), DS_IPC_MAX_DEPTH);
	msg[0] = 0;
	for (;;) {
		int sc = ds_prescan_feed(&ps, buf, len);
		if (sc == 1)
			break;
		if (sc < 0)
			return -1;
		struct pollfd pf = { .fd = fd, .events = POLLIN };
		if (poll(&pf, 1, 3000) <= 0)
			return -1;
		ssize_t r = recv(fd, buf + len, sizeof(buf) - len, 0);
		if (r <= 0)
			return -1;
		len += (size_t)r;
	}
	ds_ipc_msg m;
	uint32_t id;
	const char *why;
	int code = -1;
	if (ds_ipc_decode(buf, ps.pos, &m, &id, &why) == 0) {
		const msgpack_object *e = m.type == DS_MSG_RESPONSE ? m.error : m.params;
		if (e && e->type == MSGPACK_OBJECT_ARRAY && e->via.array.size == 2) {
			code = (int)e->via.array.ptr[0].via.u64;
			snprintf(msg, msgcap, "%.*s", (int)e->via.array.ptr[1].via.str.size, e->via.array.ptr[1].via.str.ptr);
		} else {
			code = 0;
		}
	}
	ds_ipc_msg_clear(&m);
	return code;
}

static int raw_send(int fd, const void *b, size_t n)
{
	return send(fd, b, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static int status_ok(int fd)
{
	static const uint8_t st[] = { 0x94, 0x00, 0x63, 0xa6, 's', 't', 'a', 't', 'u', 's', 0xc0 };
	char m[256];
	return raw_send(fd, st, sizeof(st)) == 0 && raw_reply(fd, m, sizeof(m)) == 0;
}

static int closed(int fd)
{
	char b;
	struct pollfd pf = { .fd = fd, .events = POLLIN };
	return poll(&pf, 1, 3000) == 1 && recv(fd, &b, 1, 0) == 0;
}

static void packed(int fd, void (*fn)(msgpack_packer *))
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	fn(&pk);
	raw_send(fd, sb.data, sb.size);
	msgpack_sbuffer_destroy(&sb);
}

static void p_unknown(msgpack_packer *pk) { ds_ipc_pack_request_head(pk, 1, "launch_missiles"); msgpack_pack_nil(pk); }
static void p_wrongtype(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 2, "generate");
	msgpack_pack_map(pk, 1);
	ds_mp_pack_str(pk, "ids");
	ds_mp_pack_str(pk, "1,2,3");
}
static void p_badtemp(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 3, "generate");
	msgpack_pack_map(pk, 2);
	ds_mp_pack_str(pk, "ids");
	msgpack_pack_array(pk, 1);
	msgpack_pack_int(pk, 1);
	ds_mp_pack_str(pk, "temperature");
	ds_mp_pack_str(pk, "hot");
}
static void p_badutf8(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 4, "tokenize");
	msgpack_pack_map(pk, 1);
	ds_mp_pack_str(pk, "text");
	ds_mp_pack_strn(pk, "ab\xff\xfe", 4);
}
static void p_badid(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 5, "generate");
	msgpack_pack_map(pk, 1);
	ds_mp_pack_str(pk, "ids");
	msgpack_pack_array(pk, 2);
	msgpack_pack_int(pk, 1);
	msgpack_pack_int(pk, 1 << 30);
}
static void p_overlimit(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 6, "generate");
	msgpack_pack_map(pk, 2);
	ds_mp_pack_str(pk, "ids");
	msgpack_pack_array(pk, 1);
	msgpack_pack_int(pk, 1);
	ds_mp_pack_str(pk, "max_tokens");
	msgpack_pack_int(pk, 1 << 28);
}
static void p_unknownkey(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 7, "generate");
	msgpack_pack_map(pk, 2);
	ds_mp_pack_str(pk, "ids");
	msgpack_pack_array(pk, 1);
	msgpack_pack_int(pk, 1);
	ds_mp_pack_str(pk, "temprature");
	msgpack_pack_double(pk, 0.5);
}
static void p_textprompt(msgpack_packer *pk)
{
	ds_ipc_pack_request_head(pk, 8, "generate");
	msgpack_pack_map(pk, 1);
	ds_mp_pack_str(pk, "prompt");
	ds_mp_pack_str(pk, "hello");
}

static void expect(int fd, void (*fn)(msgpack_packer *), int code, const char *what)
{
	char m[256];
	packed(fd, fn);
	int got = raw_reply(fd, m, sizeof(m));
	CHECK(got == code, "%s: error %d \"%s\" (want %d)", what, got, m, code);
}

static void mode_hostile(int tokenizer)
{
	int fd = raw_connect();
	if (fd < 0) {
		CHECK(0, "raw connect");
		return;
	}
	char m[256];
	expect(fd, p_unknown, DS_E_UNKNOWN_METHOD, "unknown method");
	expect(fd, p_wrongtype, DS_E_INVALID_PARAMS, "ids as a string");
	expect(fd, p_badtemp, DS_E_INVALID_PARAMS, "temperature as a string");
	expect(fd, p_badutf8, DS_E_INVALID_PARAMS, "invalid UTF-8 text");
	expect(fd, p_badid, DS_E_INVALID_PARAMS, "token id outside the vocabulary");
	expect(fd, p_overlimit, DS_E_INVALID_PARAMS, "max_tokens over limits.max_tokens");
	expect(fd, p_unknownkey, DS_E_INVALID_PARAMS, "misspelt parameter");
	if (!tokenizer)
		expect(fd, p_textprompt, DS_E_UNAVAILABLE, "text prompt on a model without tokenizer");
	static const uint8_t notarray[] = { 0x05 };
	raw_send(fd, notarray, 1);
	CHECK(raw_reply(fd, m, sizeof(m)) == DS_E_INVALID_REQUEST, "a bare integer: invalid request \"%s\"", m);
	static const uint8_t badmethod[] = { 0x94, 0x00, 0x09, 0xa2, 0xff, 0xfe, 0xc0 };
	raw_send(fd, badmethod, sizeof(badmethod));
	CHECK(raw_reply(fd, m, sizeof(m)) == DS_E_INVALID_REQUEST, "method not UTF-8: invalid request \"%s\"", m);
	CHECK(status_ok(fd), "the connection still serves after bad requests");
	close(fd);

	struct {
		const char *what;
		const uint8_t *b;
		size_t n;
		int code;
	} fatal[] = {
		{ "array32 of 4 billion elements (msgpack-c #1013)", (const uint8_t *)"\xdd\xff\xff\xff\xff", 5, DS_E_PARSE },
		{ "reserved byte 0xc1", (const uint8_t *)"\x94\x00\x01\xc1", 4, DS_E_PARSE },
		{ "a 2 MiB string header", (const uint8_t *)"\x94\x00\x01\xdb\x00\x20\x00\x00", 8, DS_E_TOO_LARGE },
	};
	for (size_t i = 0; i < sizeof(fatal) / sizeof(fatal[0]); i++) {
		fd = raw_connect();
		raw_send(fd, fatal[i].b, fatal[i].n);
		int code = raw_reply(fd, m, sizeof(m));
		CHECK(code == fatal[i].code && closed(fd), "%s: error %d \"%s\", then closed", fatal[i].what, code, m);
		close(fd);
	}
	fd = raw_connect();
	uint8_t deep[200];
	memset(deep, 0x91, sizeof(deep));
	raw_send(fd, deep, sizeof(deep));
	CHECK(raw_reply(fd, m, sizeof(m)) == DS_E_PARSE && closed(fd), "200 nested arrays: parse error, closed");
	close(fd);
	/* an oversize message sent for real, 1.5 MiB of string */
	fd = raw_connect();
	size_t big = 3 << 19;
	uint8_t *p = calloc(1, big + 16);
	memcpy(p, "\x94\x00\x01\xa1x\x81\xa4text\xdb", 12);
	p[12] = (uint8_t)(big >> 24);
	p[13] = (uint8_t)(big >> 16);
	p[14] = (uint8_t)(big >> 8);
	p[15] = (uint8_t)big;
	memset(p + 16, 'a', big);
	send(fd, p, big + 16, MSG_NOSIGNAL | MSG_DONTWAIT);
	CHECK(raw_reply(fd, m, sizeof(m)) == DS_E_TOO_LARGE, "1.5 MiB message: too large \"%s\"", m);
	free(p);
	close(fd);
	/* bytes split across writes still make one message */
	fd = raw_connect();
	static const uint8_t st[] = { 0x94, 0x00, 0x63, 0xa6, 's', 't', 'a', 't', 'u', 's', 0xc0 };
	for (size_t i = 0; i < sizeof(st); i++) {
		raw_send(fd, st + i, 1);
		usleep(2000);
	}
	CHECK(raw_reply(fd, m, sizeof(m)) == 0, "a request sent one byte at a time is answered");
	close(fd);
	fd = raw_connect();
	CHECK(fd >= 0 && status_ok(fd), "the daemon still serves new connections");
	close(fd);
}

/* Per-connection request limit (the daemon runs with max_requests_per_client = 4). */
static void mode_limits(void)
{
	ds_client *c = conn(0);
	if (!c)
		return;
	uint64_t ids[4];
	for (int i = 0; i < 4; i++)
		ids[i] = start_long(c, 300);
	static const int32_t one[] = { 1 };
	ds_gen_params p;
	ds_gen_params_init(&p);
	p.ids = one;
	p.n_ids = 1;
	uint64_t id5;
	int rc = ds_client_generate(c, &p, &id5);
	CHECK(rc == -EBUSY && ds_client_last_code(c) == DS_E_LIMIT, "fifth request on one connection: limit error \"%s\"",
	      ds_client_last_error(c));
	ds_client *other = conn(0);
	int n = 0;
	int32_t toks[8];
	p.max_tokens = 5;
	rc = other ? ds_client_generate(other, &p, &id5) : -1;
	if (!rc)
		rc = collect(other, id5, toks, 8, &n, NULL);
	CHECK(rc == DS_CLIENT_FINISH_LENGTH && n == 5, "another connection is still served");
	for (int i = 0; i < 4; i++)
		ds_client_cancel(c, ids[i]);
	ds_client_free(c);
	int live, blocks;
	CHECK(other && wait_idle(other, 3000, &live, &blocks), "all cancelled: %d live, %d blocks", live, blocks);
	ds_client_free(other);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: serve_driver SOCKET concurrent N CASES | cancel | disconnect | slowreader | hostile [tok] | limits\n");
		return 2;
	}
	sock = argv[1];
	const char *mode = argv[2];
	if (!strcmp(mode, "concurrent") && argc == 5)
		mode_concurrent(atoi(argv[3]), argv[4]);
	else if (!strcmp(mode, "cancel"))
		mode_cancel();
	else if (!strcmp(mode, "disconnect"))
		mode_disconnect();
	else if (!strcmp(mode, "slowreader"))
		mode_slowreader();
	else if (!strcmp(mode, "hostile"))
		mode_hostile(argc > 3);
	else if (!strcmp(mode, "limits"))
		mode_limits();
	else {
		fprintf(stderr, "serve_driver: unknown mode %s\n", mode);
		return 2;
	}
	return failures ? 1 : 0;
}
