/* ipc/: the msgpack pre-scanner against msgpack-c's own packer (every
 * message it packs is accepted whole, byte by byte, and never early), the
 * hostile inputs of msgpack-c issue #1013, message shapes, UTF-8, and the
 * token ring: records round-trip, wrap, fill up, a corrupt reader is
 * caught, the file is sealed, and a sleeping reader in another process is
 * woken by the futex. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "ipc/prescan.h"
#include "ipc/proto.h"
#include "ipc/ring.h"

static int scan_all(const uint8_t *b, size_t n, size_t limit, size_t *len)
{
	ds_prescan s;
	ds_prescan_init(&s, limit, DS_IPC_MAX_DEPTH);
	int rc = ds_prescan_feed(&s, b, n);
	*len = s.pos;
	return rc;
}

static void pack_sample(msgpack_packer *pk, int i)
{
	ds_ipc_pack_request_head(pk, (uint32_t)i, "generate");
	msgpack_pack_map(pk, 6);
	ds_mp_pack_str(pk, "ids");
	msgpack_pack_array(pk, (size_t)(i % 40));
	for (int k = 0; k < i % 40; k++)
		msgpack_pack_int(pk, k * 1000 - 7);
	ds_mp_pack_str(pk, "temperature");
	msgpack_pack_double(pk, 0.5 * i);
	ds_mp_pack_str(pk, "f32");
	msgpack_pack_float(pk, 1.5f);
	ds_mp_pack_str(pk, "big");
	msgpack_pack_uint64(pk, UINT64_MAX - (uint64_t)i);
	ds_mp_pack_str(pk, "bin");
	char bin[300] = { 0 };
	msgpack_pack_bin(pk, (size_t)(i * 7) % 300);
	msgpack_pack_bin_body(pk, bin, (size_t)(i * 7) % 300);
	ds_mp_pack_str(pk, "nest");
	msgpack_pack_array(pk, 2);
	msgpack_pack_map(pk, 1);
	msgpack_pack_nil(pk);
	msgpack_pack_true(pk);
	msgpack_pack_ext(pk, 3, 5);
	msgpack_pack_ext_body(pk, "abc", 3);
}

/* Every prefix is "need more", the whole is one message of its own length,
 * also when followed by the start of the next one. */
static void test_prescan_packed(void **st)
{
	(void)st;
	for (int i = 0; i < 60; i++) {
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		pack_sample(&pk, i);
		size_t whole = sb.size;
		pack_sample(&pk, i + 1);
		const uint8_t *b = (const uint8_t *)sb.data;
		size_t len;
		for (size_t k = 0; k < whole; k++)
			assert_int_equal(scan_all(b, k, 1 << 20, &len), 0);
		assert_int_equal(scan_all(b, whole, 1 << 20, &len), 1);
		assert_int_equal(len, whole);
		assert_int_equal(scan_all(b, sb.size, 1 << 20, &len), 1);
		assert_int_equal(len, whole);
		/* fed one byte at a time through the same state */
		ds_prescan s;
		ds_prescan_init(&s, 1 << 20, DS_IPC_MAX_DEPTH);
		int rc = 0;
		for (size_t k = 1; k <= whole && rc == 0; k++)
			rc = ds_prescan_feed(&s, b, k);
		assert_int_equal(rc, 1);
		assert_int_equal(s.pos, whole);
		/* msgpack-c agrees on the length */
		ds_ipc_msg m;
		uint32_t id;
		const char *why;
		assert_int_equal(ds_ipc_decode(b, whole, &m, &id, &why), 0);
		assert_int_equal(m.msgid, (uint32_t)i);
		assert_true(ds_ipc_method_is(&m, "generate"));
		ds_ipc_msg_clear(&m);
		msgpack_sbuffer_destroy(&sb);
	}
}

static void test_prescan_hostile(void **st)
{
	(void)st;
	size_t len;
	/* msgpack-c #1013: an array32 of 0xffff0000 elements in five bytes */
	const uint8_t a32[] = { 0xdd, 0xff, 0xff, 0x00, 0x00 };
	assert_int_equal(scan_all(a32, sizeof(a32), 1 << 20, &len), -EBADMSG);
	const uint8_t m32[] = { 0xdf, 0x00, 0x10, 0x00, 0x00 }; /* map32: 2^20 pairs need 2 MiB */
	assert_int_equal(scan_all(m32, sizeof(m32), 1 << 20, &len), -EBADMSG);
	const uint8_t a16[] = { 0xdc, 0x01, 0x00 }; /* 256 elements, fine under a 1 MiB limit: needs more */
	assert_int_equal(scan_all(a16, sizeof(a16), 1 << 20, &len), 0);
	assert_int_equal(scan_all(a16, sizeof(a16), 200, &len), -EBADMSG);
	const uint8_t s32[] = { 0xdb, 0x00, 0x20, 0x00, 0x00 }; /* a 2 MiB string */
	assert_int_equal(scan_all(s32, sizeof(s32), 1 << 20, &len), -EMSGSIZE);
	const uint8_t c1[] = { 0x93, 0x00, 0xc1, 0x00 };
	assert_int_equal(scan_all(c1, sizeof(c1), 1 << 20, &len), -EBADMSG);
	uint8_t deep[64];
	memset(deep, 0x91, sizeof(deep)); /* [[[[...]]]] */
	assert_int_equal(scan_all(deep, sizeof(deep), 1 << 20, &len), -EBADMSG);
	memset(deep, 0x91, DS_IPC_MAX_DEPTH);
	deep[DS_IPC_MAX_DEPTH] = 0xc0;
	assert_int_equal(scan_all(deep, DS_IPC_MAX_DEPTH + 1, 1 << 20, &len), 1);
	/* a stream of nils longer than the limit is oversize, not "need more" */
	uint8_t nils[300];
	nils[0] = 0xdc;
	nils[1] = 0x01;
	nils[2] = 0x00;
	memset(nils + 3, 0xc0, sizeof(nils) - 3);
	assert_int_equal(scan_all(nils, sizeof(nils), 128, &len), -EBADMSG);
	assert_int_equal(scan_all(nils, 259, 1 << 20, &len), 1);
	assert_int_equal(len, 259u);
}

#define S(x) x, sizeof(x) - 1
static void test_decode_shapes(void **st)
{
	(void)st;
	struct {
		const char *bytes;
		size_t n;
		int ok;
		uint32_t msgid;
	} cases[] = {
		{ S("\x94\x00\x07\xa6status\xc0"), 1, 7 },
		{ S("\x93\x02\xa6resume\xc0"), 1, UINT32_MAX },
		{ S("\x05"), 0, UINT32_MAX },                          /* not an array */
		{ S("\x94\x03\x07\xa6status\xc0"), 0, UINT32_MAX },   /* type 3 */
		{ S("\x94\x00\x07\x05\xc0"), 0, 7 },                   /* method not a string */
		{ S("\x94\x00\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xa1x\xc0"), 0, UINT32_MAX }, /* msgid >= 2^32 */
		{ S("\x94\x00\x07\xa2\xff\xfe\xc0"), 0, 7 },           /* method not UTF-8 */
		{ S("\x94\x00\x07\xa1x\x05"), 0, 7 },                  /* params an int */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		ds_ipc_msg m;
		uint32_t id;
		const char *why = NULL;
		int rc = ds_ipc_decode((const uint8_t *)cases[i].bytes, cases[i].n, &m, &id, &why);
		if ((rc == 0) != cases[i].ok)
			fail_msg("case %zu: rc %d (%s)", i, rc, why ? why : "");
		if (!cases[i].ok)
			assert_non_null(why);
		assert_int_equal(id, cases[i].msgid);
		ds_ipc_msg_clear(&m);
	}
}

static void test_utf8(void **st)
{
	(void)st;
	assert_true(ds_utf8_valid("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80", 15));
	assert_false(ds_utf8_valid("\xc0\xaf", 2));         /* overlong */
	assert_false(ds_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
	assert_false(ds_utf8_valid("\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
	assert_false(ds_utf8_valid("\xe2\x82", 2));         /* truncated */
	assert_false(ds_utf8_valid("\x80", 1));
	assert_int_equal(ds_utf8_complete("ab\xe2\x82", 4), 2);
	assert_int_equal(ds_utf8_complete("ab\xe2\x82\xac", 5), 5);
}

static void test_mp_getters(void **st)
{
	(void)st;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 4);
	ds_mp_pack_str(&pk, "n");
	msgpack_pack_int(&pk, -5);
	ds_mp_pack_str(&pk, "s");
	ds_mp_pack_strn(&pk, "\xff", 1);
	ds_mp_pack_str(&pk, "d");
	msgpack_pack_double(&pk, NAN);
	ds_mp_pack_str(&pk, "b");
	msgpack_pack_true(&pk);
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	size_t off = 0;
	assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, &off), MSGPACK_UNPACK_SUCCESS);
	int64_t v;
	double d;
	int b;
	const char *s;
	size_t n;
	assert_int_equal(ds_mp_int(&u.data, "n", -10, 10, &v), 0);
	assert_int_equal(v, -5);
	assert_int_equal(ds_mp_int(&u.data, "n", 0, 10, &v), -EINVAL);
	assert_int_equal(ds_mp_int(&u.data, "missing", 0, 10, &v), -ENOENT);
	assert_int_equal(ds_mp_int(&u.data, "b", 0, 10, &v), -EINVAL);
	assert_int_equal(ds_mp_str(&u.data, "s", &s, &n), -EILSEQ);
	assert_int_equal(ds_mp_double(&u.data, "d", -1, 1, &d), -EINVAL);
	assert_int_equal(ds_mp_bool(&u.data, "b", &b), 0);
	assert_int_equal(b, 1);
	msgpack_unpacked_destroy(&u);
	msgpack_sbuffer_destroy(&sb);
}

/* ---- ring ---- */

static ds_ring_event tok_ev(uint64_t id, uint32_t seq, const char *text)
{
	return (ds_ring_event){ .type = DS_REC_TOKEN, .request_id = id, .seq = seq, .token = (int32_t)seq * 3,
				.logprob = NAN, .text = text, .text_len = (uint32_t)strlen(text) };
}

static void attach(ds_ring_writer *w, ds_ring_reader **r)
{
	int m, e;
	ds_ring_writer_fds(w, &m, &e);
	assert_int_equal(ds_ring_attach(dup(m), dup(e), r), 0);
}

static void test_ring_roundtrip(void **st)
{
	(void)st;
	ds_ring_writer *w;
	ds_ring_reader *r;
	assert_int_equal(ds_ring_create(4096, &w), 0);
	attach(w, &r);
	ds_ring_event ev;
	assert_int_equal(ds_ring_next(r, &ev), 0);
	/* many laps around a small ring: order and content survive the wrap */
	char text[64];
	uint32_t got = 0;
	for (uint32_t i = 0; i < 5000; i++) {
		snprintf(text, sizeof(text), "piece-%u%.*s", i, (int)(i % 23), "abcdefghijklmnopqrstuvwxyz");
		ds_ring_event e = tok_ev(1, i, text);
		int rc = ds_ring_put(w, &e);
		if (rc == -EAGAIN) { /* full: drain and retry */
			ds_ring_publish(w);
			while (ds_ring_next(r, &ev) == 1) {
				char want[64];
				snprintf(want, sizeof(want), "piece-%u%.*s", got, (int)(got % 23), "abcdefghijklmnopqrstuvwxyz");
				assert_int_equal(ev.seq, got);
				assert_int_equal(ev.token, (int32_t)got * 3);
				assert_int_equal(ev.text_len, strlen(want));
				assert_memory_equal(ev.text, want, ev.text_len);
				got++;
			}
			assert_true(ds_ring_take_writer_waiting(r));
			rc = ds_ring_put(w, &e);
		}
		assert_int_equal(rc, 0);
	}
	ds_ring_stats stt = { .prompt_tokens = 4, .generated_tokens = 5000, .ttft_ns = 77 };
	ds_ring_top top[2] = { { 1, -0.5f }, { 2, -1.5f } };
	ds_ring_event fin = { .type = DS_REC_FINAL, .finish = DS_FINISH_LENGTH, .request_id = 1, .seq = 5000,
			      .token = -1, .logprob = NAN, .stats = &stt, .top = top, .n_top = 2 };
	while (ds_ring_put(w, &fin) == -EAGAIN) {
		ds_ring_publish(w);
		while (ds_ring_next(r, &ev) == 1)
			got++;
	}
	ds_ring_publish(w);
	int last_final = 0;
	while (ds_ring_next(r, &ev) == 1) {
		if (ev.type == DS_REC_FINAL) {
			last_final = 1;
			assert_int_equal(ev.finish, DS_FINISH_LENGTH);
			assert_int_equal(ev.stats->generated_tokens, 5000);
			assert_int_equal(ev.stats->ttft_ns, 77);
			assert_int_equal(ev.n_top, 2);
			assert_int_equal(ev.top[1].token, 2);
		} else {
			got++;
		}
	}
	assert_int_equal(got, 5000);
	assert_true(last_final);
	ds_ring_reader_free(r);
	ds_ring_writer_free(w);
}

static void test_ring_hostile_reader(void **st)
{
	(void)st;
	ds_ring_writer *w;
	assert_int_equal(ds_ring_create(4096, &w), 0);
	int m, e;
	ds_ring_writer_fds(w, &m, &e);
	/* sealed: the client can neither shrink (SIGBUS for the daemon) nor grow it */
	assert_true(ftruncate(m, 1024) < 0);
	assert_true(ftruncate(m, 1 << 20) < 0);
	ds_ring_hdr *h = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	assert_true(h != MAP_FAILED);
	ds_ring_event ev = tok_ev(9, 0, "x");
	assert_int_equal(ds_ring_put(w, &ev), 0);
	ds_ring_publish(w);
	h->read_pos = 1ull << 40; /* ahead of what was written */
	assert_int_equal(ds_ring_put(w, &ev), -EPROTO);
	assert_true(ds_ring_room(w) < 0);
	h->read_pos = 3; /* not on a record boundary */
	assert_int_equal(ds_ring_put(w, &ev), -EPROTO);
	h->read_pos = 0;
	assert_int_equal(ds_ring_put(w, &ev), 0);
	/* a record that can never fit */
	char big[DS_RING_MAX_TEXT + 1];
	memset(big, 'a', sizeof(big));
	ds_ring_event b2 = tok_ev(9, 1, "");
	b2.text = big;
	b2.text_len = sizeof(big);
	assert_int_equal(ds_ring_put(w, &b2), -E2BIG);
	munmap(h, 4096);
	ds_ring_writer_free(w);
}

static void test_ring_hostile_writer(void **st)
{
	(void)st;
	/* the reader checks the daemon's records too */
	ds_ring_writer *w;
	ds_ring_reader *r;
	assert_int_equal(ds_ring_create(4096, &w), 0);
	attach(w, &r);
	int m, e;
	ds_ring_writer_fds(w, &m, &e);
	uint8_t *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	ds_ring_hdr *h = (ds_ring_hdr *)p;
	ds_ring_rec bad = { .size = 4000, .type = DS_REC_TOKEN };
	memcpy(p + DS_RING_HDR_SIZE, &bad, sizeof(bad));
	h->write_pos = 64; /* claims 64 bytes; the record says 4000 */
	ds_ring_event ev;
	assert_int_equal(ds_ring_next(r, &ev), -EPROTO);
	bad.size = 32;
	bad.text_len = 100; /* text past the record */
	memcpy(p + DS_RING_HDR_SIZE, &bad, sizeof(bad));
	h->write_pos = 32;
	assert_int_equal(ds_ring_next(r, &ev), -EPROTO);
	h->write_pos = 1 << 20; /* more than the ring holds */
	assert_int_equal(ds_ring_next(r, &ev), -EPROTO);
	munmap(p, 8192);
	ds_ring_reader_free(r);
	ds_ring_writer_free(w);
}

/* A reader asleep in another process is woken by the futex; an awake one
 * gets no wake-up at all (publish returns 0). */
static void test_ring_futex_cross_process(void **st)
{
	(void)st;
	ds_ring_writer *w;
	assert_int_equal(ds_ring_create(4096, &w), 0);
	int m, e;
	ds_ring_writer_fds(w, &m, &e);
	pid_t pid = fork();
	if (pid == 0) {
		ds_ring_reader *r;
		if (ds_ring_attach(dup(m), dup(e), &r))
			_exit(10);
		ds_ring_event ev;
		int n = 0;
		while (n < 3) {
			int rc = ds_ring_next(r, &ev);
			if (rc < 0)
				_exit(11);
			if (rc == 1) {
				if (ev.seq != (uint32_t)n)
					_exit(12);
				n++;
				continue;
			}
			if (ds_ring_wait(r, 5000) == -ETIMEDOUT)
				_exit(13);
		}
		_exit(0);
	}
	ds_ring_hdr *h = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	int woke = 0;
	for (uint32_t i = 0; i < 3; i++) {
		/* wait until the child sleeps, then publish: exactly one wake-up */
		for (int k = 0; k < 5000 && !__atomic_load_n(&h->reader_sleep, __ATOMIC_SEQ_CST); k++)
			usleep(1000);
		ds_ring_event ev = tok_ev(1, i, "t");
		assert_int_equal(ds_ring_put(w, &ev), 0);
		woke += ds_ring_publish(w);
	}
	int status;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_true(woke >= 1);
	/* nobody sleeps now: publishing costs no system call */
	ds_ring_event ev = tok_ev(1, 9, "t");
	assert_int_equal(ds_ring_put(w, &ev), 0);
	assert_int_equal(ds_ring_publish(w), 0);
	munmap(h, 4096);
	ds_ring_writer_free(w);
}

static void test_ring_eventfd(void **st)
{
	(void)st;
	ds_ring_writer *w;
	ds_ring_reader *r;
	assert_int_equal(ds_ring_create(4096, &w), 0);
	attach(w, &r);
	assert_int_equal(ds_ring_arm(r), 0);
	ds_ring_event ev = tok_ev(1, 0, "t");
	assert_int_equal(ds_ring_put(w, &ev), 0);
	assert_int_equal(ds_ring_publish(w), 1);
	uint64_t v = 0;
	assert_int_equal(read(ds_ring_reader_efd(r), &v, 8), 8);
	assert_int_equal(v, 1);
	ds_ring_disarm(r);
	assert_int_equal(ds_ring_next(r, &ev), 1);
	assert_int_equal(ds_ring_arm(r), 0);
	ds_ring_reader_free(r);
	ds_ring_writer_free(w);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_prescan_packed),   cmocka_unit_test(test_prescan_hostile),
		cmocka_unit_test(test_decode_shapes),    cmocka_unit_test(test_utf8),
		cmocka_unit_test(test_mp_getters),       cmocka_unit_test(test_ring_roundtrip),
		cmocka_unit_test(test_ring_hostile_reader), cmocka_unit_test(test_ring_hostile_writer),
		cmocka_unit_test(test_ring_futex_cross_process), cmocka_unit_test(test_ring_eventfd),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
