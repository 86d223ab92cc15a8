/* bench_ipc — the token ring against the socket path, across processes, in
 * one run (make bench-ipc): throughput (events/s, a reader that never
 * sleeps) and wake-up latency (write to the reader seeing it, p50/p99) with
 * a busy (spinning) reader and a sleeping one (futex). The socket path
 * sends the same events as msgpack notifications over a UNIX stream socket
 * (the daemon's no-ring path) and the reader decodes them. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ipc/prescan.h"
#include "ipc/proto.h"
#include "ipc/ring.h"

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Shared with the child: latencies it measured. */
typedef struct shared {
	uint64_t lat[4096];
	int n;
	double eps;
} shared;

#define N_THRU 2000000
#define N_LAT 2000

static ds_ring_event ev_of(uint32_t seq, uint64_t t)
{
	static const char piece[] = " token";
	/* the send time travels in request_id, so the reader can time it */
	return (ds_ring_event){ .type = DS_REC_TOKEN, .request_id = t, .seq = seq, .token = (int32_t)seq,
				.logprob = NAN, .text = piece, .text_len = 6 };
}

/* ---- ring ---- */

static void ring_reader(int memfd, int efd, shared *sh, int n, int sleeping, int latency)
{
	ds_ring_reader *r;
	if (ds_ring_attach(memfd, efd, &r))
		_exit(1);
	ds_ring_event ev;
	int got = 0;
	uint64_t t0 = 0;
	while (got < n) {
		int rc = ds_ring_next(r, &ev);
		if (rc < 0)
			_exit(2);
		if (rc == 1) {
			if (!got)
				t0 = now_ns();
			if (latency && got < 4096)
				sh->lat[got] = now_ns() - ev.request_id;
			got++;
			continue;
		}
		ds_ring_take_writer_waiting(r);
		if (sleeping)
			ds_ring_wait(r, 1000);
	}
	if (!latency)
		sh->eps = n / ((now_ns() - t0) / 1e9);
	sh->n = got;
	_exit(0);
}

static void run_ring(shared *sh, int n, int sleeping, int latency)
{
	ds_ring_writer *w;
	if (ds_ring_create(1 << 20, &w))
		exit(1);
	int m, e;
	ds_ring_writer_fds(w, &m, &e);
	pid_t pid = fork();
	if (pid == 0)
		ring_reader(m, e, sh, n, sleeping, latency);
	usleep(50000);
	for (int i = 0; i < n; i++) {
		if (latency)
			usleep(200); /* let the reader go idle (or to sleep) between events */
		ds_ring_event ev = ev_of((uint32_t)i, now_ns());
		while (ds_ring_put(w, &ev) == -EAGAIN)
			ds_ring_publish(w);
		if (latency || (i & 63) == 63)
			ds_ring_publish(w); /* the daemon publishes once per engine step */
	}
	ds_ring_publish(w);
	waitpid(pid, NULL, 0);
	ds_ring_writer_free(w);
}

/* ---- socket notifications ---- */

static void sock_reader(int fd, shared *sh, int n, int latency)
{
	static uint8_t buf[1 << 20];
	size_t len = 0;
	int got = 0;
	uint64_t t0 = 0;
	ds_prescan ps;
	ds_prescan_init(&ps, 1 << 16, DS_IPC_MAX_DEPTH);
	while (got < n) {
		ssize_t r = recv(fd, buf + len, sizeof(buf) - len, 0);
		if (r <= 0)
			_exit(3);
		len += (size_t)r;
		size_t off = 0;
		for (;;) {
			int sc = ds_prescan_feed(&ps, buf + off, len - off);
			if (sc != 1)
				break;
			ds_ipc_msg m;
			uint32_t id;
			const char *why;
			if (ds_ipc_decode(buf + off, ps.pos, &m, &id, &why))
				_exit(4);
			uint64_t t;
			ds_mp_uint64(m.params, "id", &t);
			if (!got)
				t0 = now_ns();
			if (latency && got < 4096)
				sh->lat[got] = now_ns() - t;
			got++;
			ds_ipc_msg_clear(&m);
			off += ps.pos;
			ds_prescan_init(&ps, 1 << 16, DS_IPC_MAX_DEPTH);
		}
		memmove(buf, buf + off, len - off);
		len -= off;
	}
	if (!latency)
		sh->eps = n / ((now_ns() - t0) / 1e9);
	sh->n = got;
	_exit(0);
}

static void pack_ev(msgpack_sbuffer *sb, uint32_t seq, uint64_t t)
{
	msgpack_packer pk;
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	ds_ipc_pack_notify_head(&pk, "event");
	msgpack_pack_map(&pk, 4);
	ds_mp_pack_str(&pk, "id");
	msgpack_pack_uint64(&pk, t);
	ds_mp_pack_str(&pk, "seq");
	msgpack_pack_uint32(&pk, seq);
	ds_mp_pack_str(&pk, "token");
	msgpack_pack_int32(&pk, (int32_t)seq);
	ds_mp_pack_str(&pk, "text");
	ds_mp_pack_str(&pk, " token");
}

static void run_sock(shared *sh, int n, int latency)
{
	int sv[2];
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		sock_reader(sv[1], sh, n, latency);
	}
	close(sv[1]);
	usleep(50000);
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	for (int i = 0; i < n; i++) {
		if (latency)
			usleep(200);
		pack_ev(&sb, (uint32_t)i, now_ns());
		/* like the daemon: one write per engine step's batch (64 events), or per event for latency */
		if (latency || (i & 63) == 63 || i == n - 1) {
			size_t off = 0;
			while (off < sb.size) {
				ssize_t w = send(sv[0], sb.data + off, sb.size - off, 0);
				if (w <= 0)
					exit(1);
				off += (size_t)w;
			}
			msgpack_sbuffer_clear(&sb);
		}
	}
	msgpack_sbuffer_destroy(&sb);
	waitpid(pid, NULL, 0);
	close(sv[0]);
}

static void report_lat(const char *name, shared *sh)
{
	int n = sh->n < 4096 ? sh->n : 4096;
	qsort(sh->lat, (size_t)n, sizeof(uint64_t), cmp_u64);
	printf("%-34s p50 %7.2f us  p99 %7.2f us  (%d events)\n", name, sh->lat[n / 2] / 1e3, sh->lat[n * 99 / 100] / 1e3, n);
}

int main(void)
{
	shared *sh = mmap(NULL, sizeof(shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	printf("bench_ipc: %d events for throughput, %d for latency, writer and reader in two processes\n", N_THRU, N_LAT);
	memset(sh, 0, sizeof(*sh));
	run_ring(sh, N_THRU, 0, 0);
	printf("%-34s %12.0f events/s\n", "ring throughput (busy reader)", sh->eps);
	memset(sh, 0, sizeof(*sh));
	run_ring(sh, N_THRU, 1, 0);
	printf("%-34s %12.0f events/s\n", "ring throughput (sleeping reader)", sh->eps);
	memset(sh, 0, sizeof(*sh));
	run_sock(sh, N_THRU, 0);
	printf("%-34s %12.0f events/s\n", "socket msgpack throughput", sh->eps);
	memset(sh, 0, sizeof(*sh));
	run_ring(sh, N_LAT, 0, 1);
	report_lat("ring wake latency, busy reader", sh);
	memset(sh, 0, sizeof(*sh));
	run_ring(sh, N_LAT, 1, 1);
	report_lat("ring wake latency, futex sleeper", sh);
	memset(sh, 0, sizeof(*sh));
	run_sock(sh, N_LAT, 1);
	report_lat("socket wake latency (blocking recv)", sh);
	return 0;
}
