/* test_wload.c — the io_uring weight loader against the mmap path (a second,
 * independent reader of the same files): synthetic multi-shard models whose
 * tensors sit at unaligned offsets, the fixture models, every I/O mode, and
 * the failures it must name (truncated, resized, replaced, modified or
 * mismatched shards, EIO, EOF, short reads, a refused O_DIRECT). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/weights.h"
#include "model/wload.h"
#include "tests/fixture_util.h"

/* ---- synthetic models ---- */

static uint64_t rng_state;
static uint8_t rnd8(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint8_t)(rng_state >> 24);
}

typedef struct spec {
	const char *dtype;
	size_t esize;
	int64_t dims[2];
} spec;

/* Sizes chosen so data offsets wander off every alignment: odd byte counts,
 * tensors larger than the test's 64 KiB staging buffers, an empty one. */
static const spec SPECS[] = {
	{ "U8", 1, { 3, 1 } },        { "BF16", 2, { 333, 77 } },  { "F32", 4, { 129, 1 } },
	{ "U8", 1, { 70001, 1 } },    { "BF16", 2, { 0, 5 } },     { "F8_E4M3", 1, { 257, 129 } },
	{ "F16", 2, { 4099, 3 } },    { "BF16", 2, { 512, 300 } }, { "U8", 1, { 1, 1 } },
	{ "F32", 4, { 1000, 41 } },
};
#define NSPECS (sizeof(SPECS) / sizeof(SPECS[0]))

static void write_all(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = write(fd, b, n);
		assert_true(w > 0);
		b += w;
		n -= (size_t)w;
	}
}

/* One shard: tensors "<prefix>.tK" for K in [0, count), header padded with
 * pad spaces (safetensors allows it) to move the data start. */
static void write_shard(const char *path, const char *prefix, int count, int first_spec, int pad)
{
	char *hdr = malloc(1 << 16);
	size_t hl = 0, off = 0;
	hl += (size_t)sprintf(hdr + hl, "{\"__metadata__\":{\"format\":\"pt\"}");
	for (int k = 0; k < count; k++) {
		const spec *s = &SPECS[(first_spec + k) % NSPECS];
		size_t n = (size_t)s->dims[0] * (size_t)s->dims[1] * s->esize;
		hl += (size_t)sprintf(hdr + hl, ",\"%s.t%d\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],"
				      "\"data_offsets\":[%zu,%zu]}",
				      prefix, k, s->dtype, (long long)s->dims[0], (long long)s->dims[1], off, off + n);
		off += n;
	}
	hl += (size_t)sprintf(hdr + hl, "}");
	for (int i = 0; i < pad; i++)
		hdr[hl++] = ' ';
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	assert_true(fd >= 0);
	uint8_t len8[8];
	for (int i = 0; i < 8; i++)
		len8[i] = (uint8_t)((uint64_t)hl >> (8 * i));
	write_all(fd, len8, 8);
	write_all(fd, hdr, hl);
	uint8_t *data = malloc(off ? off : 1);
	for (size_t i = 0; i < off; i++)
		data[i] = rnd8();
	write_all(fd, data, off);
	close(fd);
	free(data);
	free(hdr);
}

/* nshards shards named by an index (nshards == 0: one model.safetensors). */
static void write_model(const char *dir, int nshards, uint64_t seed)
{
	char path[700];
	rng_state = seed | 1;
	if (nshards == 0) {
		snprintf(path, sizeof(path), "%s/model.safetensors", dir);
		write_shard(path, "m", 14, 3, 5);
		return;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fprintf(f, "{\"metadata\":{},\"weight_map\":{");
	for (int s = 0; s < nshards; s++) {
		char file[64], prefix[16];
		snprintf(file, sizeof(file), "model-%05d-of-%05d.safetensors", s + 1, nshards);
		snprintf(prefix, sizeof(prefix), "s%d", s);
		int count = 7 + 3 * s;
		for (int k = 0; k < count; k++)
			fprintf(f, "%s\"%s.t%d\":\"%s\"", s || k ? "," : "", prefix, k, file);
		snprintf(path, sizeof(path), "%s/%s", dir, file);
		write_shard(path, prefix, count, s, 1 + 13 * s);
	}
	fprintf(f, "}}");
	fclose(f);
}

static char *shard_path(const char *dir, int s, int n)
{
	static char p[700];
	snprintf(p, sizeof(p), "%s/model-%05d-of-%05d.safetensors", dir, s + 1, n);
	return p;
}

/* ---- comparing with the mmap path ---- */

/* Loads dir with opts (NULL refs: all) and checks every loaded tensor against
 * the mmap'ed bytes, the unloaded ones stay NULL. Returns the load's rc. */
static int load_and_compare(const char *dir, const ds_wload_opts *o, const ds_wload_sink *custom,
			    ds_wload_host *custom_host, ds_wload_result *res, ds_err *err)
{
	ds_err e = { { 0 } };
	ds_weights *wm = NULL, *wd = NULL;
	assert_int_equal(ds_weights_open(dir, 0, &wm, &e), 0);
	assert_int_equal(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	ds_wload_host host_local, *h = custom_host ? custom_host : &host_local;
	ds_wload_sink sink;
	if (!custom_host)
		assert_int_equal(ds_wload_host_init(h, wd), 0);
	if (custom)
		sink = *custom;
	else
		ds_wload_host_sink(h, &sink);
	h->w = wd;
	ds_wload_progress prog = { 0 };
	ds_wload_result r;
	int rc = ds_wload_run(wd, NULL, 0, &sink, o, &prog, &r, err ? err : &e);
	if (rc == 0) {
		uint64_t total = 0;
		for (size_t i = 0; i < ds_weights_count(wd); i++) {
			const ds_tensor_ref *a = ds_weights_at(wd, i);
			const ds_tensor_ref *b = ds_weights_find(wm, a->name);
			assert_non_null(b);
			assert_int_equal(a->nbytes, b->nbytes);
			assert_non_null(h->data[i]);
			assert_memory_equal(h->data[i], b->data, b->nbytes ? b->nbytes : 0);
			total += a->nbytes;
		}
		assert_int_equal(r.tensor_bytes, total);
		assert_int_equal(r.tensors, (int)ds_weights_count(wd));
		ds_wload_snapshot snap;
		ds_wload_progress_read(&prog, &snap);
		assert_int_equal(snap.done, total);
		assert_int_equal(snap.total, total);
		assert_true(snap.finished);
	}
	if (res)
		*res = r;
	if (!custom_host)
		ds_wload_host_free(h);
	ds_weights_free(wm);
	ds_weights_free(wd);
	return rc;
}

static const ds_wload_opts SMALL = { .buf_bytes = 64 << 10, .n_bufs = 4, .shards_in_flight = 2 };

typedef struct tmp {
	char dir[512];
} tmp;

static int setup_multi(void **state)
{
	tmp *t = calloc(1, sizeof(tmp));
	if (fx_tmpdir(t->dir, sizeof(t->dir)))
		return -1;
	write_model(t->dir, 4, 42);
	*state = t;
	return 0;
}

static int teardown_tmp(void **state)
{
	tmp *t = *state;
	fx_rmtree(t->dir);
	free(t);
	return 0;
}

static void test_modes_match_mmap(void **state)
{
	tmp *t = *state;
	const struct {
		unsigned flags;
		size_t buf;
		int nbufs, sif;
	} modes[] = {
		{ 0, 0, 0, 0 },  /* defaults: 4 MiB buffers hold whole shards */
		{ 0, 64 << 10, 4, 2 },
		{ 0, 4096, 3, 1 },  /* one block per read: every tensor spans many */
		{ 0, 8192, 1, 3 },  /* a single buffer: strictly sequential */
		{ DS_WLOAD_BUFFERED, 64 << 10, 4, 2 },
		{ DS_WLOAD_NO_REGISTER, 64 << 10, 5, 4 },
		{ DS_WLOAD_NO_URING, 64 << 10, 4, 2 },
		{ DS_WLOAD_NO_URING | DS_WLOAD_BUFFERED, 12288, 2, 1 },
	};
	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		ds_wload_opts o = { .flags = modes[i].flags, .buf_bytes = modes[i].buf, .n_bufs = modes[i].nbufs,
				    .shards_in_flight = modes[i].sif };
		ds_wload_result r;
		ds_err e = { { 0 } };
		int rc = load_and_compare(t->dir, &o, NULL, NULL, &r, &e);
		if (rc)
			fail_msg("mode %zu: %s", i, e.msg);
		assert_int_equal(r.shards, 4);
		assert_int_equal(r.io_uring, !(modes[i].flags & DS_WLOAD_NO_URING));
		if (modes[i].flags & DS_WLOAD_BUFFERED) {
			assert_int_equal(r.buffered_shards, 4);
			assert_int_equal(r.direct_refused, 0);
		} else {
			/* Every shard went one way or the other, and a refusal says so. */
			assert_int_equal(r.buffered_shards, r.direct_refused ? r.buffered_shards : 0);
			if (i == 0)
				print_message("O_DIRECT on %s: %s\n", t->dir, r.direct_refused ? "refused" : "used");
		}
		if (modes[i].flags & (DS_WLOAD_NO_REGISTER | DS_WLOAD_NO_URING))
			assert_int_equal(r.registered, 0);
		assert_true(r.read_bytes >= r.tensor_bytes);
	}
}

static void test_single_file_model(void **state)
{
	char dir[512];
	assert_int_equal(fx_tmpdir(dir, sizeof(dir)), 0);
	write_model(dir, 0, 7);
	assert_int_equal(load_and_compare(dir, &SMALL, NULL, NULL, NULL, NULL), 0);
	ds_wload_opts b = SMALL;
	b.flags = DS_WLOAD_BUFFERED;
	assert_int_equal(load_and_compare(dir, &b, NULL, NULL, NULL, NULL), 0);
	fx_rmtree(dir);
}

/* Whatever fixture models exist (tests/fixtures/<name>/ with safetensors). */
static void test_fixture_models(void **state)
{
	char root[600];
	snprintf(root, sizeof(root), "%s/tests/fixtures", fx_srcdir());
	DIR *d = opendir(root);
	int n = 0;
	for (struct dirent *de; d && (de = readdir(d));) {
		if (de->d_name[0] == '.')
			continue;
		char dir[900], p1[1000], p2[1000];
		snprintf(dir, sizeof(dir), "%s/%s", root, de->d_name);
		snprintf(p1, sizeof(p1), "%s/model.safetensors", dir);
		snprintf(p2, sizeof(p2), "%s/model.safetensors.index.json", dir);
		if (access(p1, R_OK) && access(p2, R_OK))
			continue;
		for (int mode = 0; mode < 2; mode++) {
			ds_wload_opts o = SMALL;
			o.flags = mode ? DS_WLOAD_BUFFERED : 0;
			ds_err e = { { 0 } };
			if (load_and_compare(dir, &o, NULL, NULL, NULL, &e))
				fail_msg("%s: %s", dir, e.msg);
		}
		n++;
	}
	if (d)
		closedir(d);
	print_message("fixture models compared: %d\n", n);
	/* The fixtures are committed (tests/fixtures/{v3,v2lite,fp8}). */
	assert_true(n >= 1);
}

/* A subset in reverse order with every third tensor: the rest stays unread. */
static void test_subset(void **state)
{
	tmp *t = *state;
	ds_err e = { { 0 } };
	ds_weights *wm = NULL, *wd = NULL;
	assert_int_equal(ds_weights_open(t->dir, 0, &wm, &e), 0);
	assert_int_equal(ds_weights_open(t->dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	size_t n = ds_weights_count(wd), k = 0;
	const ds_tensor_ref **refs = calloc(n, sizeof(*refs));
	for (size_t i = n; i-- > 0;)
		if (i % 3 == 0)
			refs[k++] = ds_weights_at(wd, i);
	ds_wload_host h;
	ds_wload_sink sink;
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	ds_wload_host_sink(&h, &sink);
	ds_wload_result r;
	assert_int_equal(ds_wload_run(wd, refs, k, &sink, &SMALL, NULL, &r, &e), 0);
	assert_int_equal(r.tensors, (int)k);
	for (size_t i = 0; i < n; i++) {
		const ds_tensor_ref *a = ds_weights_at(wd, i);
		if (i % 3) {
			assert_null(h.data[i]);
			continue;
		}
		assert_memory_equal(h.data[i], ds_weights_find(wm, a->name)->data, a->nbytes);
	}
	ds_wload_host_free(&h);
	/* The same tensor twice is refused. */
	refs[1] = refs[0];
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	assert_int_equal(ds_wload_run(wd, refs, k, &sink, &SMALL, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "listed twice"));
	ds_wload_host_free(&h);
	free(refs);
	ds_weights_free(wm);
	ds_weights_free(wd);
}

/* ---- an asynchronous sink: copies happen only in buffer_wait ---- */

typedef struct qcopy {
	void *dst;
	const void *src;
	size_t len;
} qcopy;

typedef struct async_sink {
	ds_wload_host h;
	qcopy q[16][256];
	int nq[16];
	int allocs, frees, waits;
} async_sink;

static int as_alloc(void *ctx, size_t bytes, int buf, void **out)
{
	async_sink *a = ctx;
	a->allocs++;
	return -posix_memalign(out, 4096, bytes);
}

static void as_free(void *ctx, void *p, int buf)
{
	async_sink *a = ctx;
	/* Freed only after its pending copies ran. */
	assert_int_equal(a->nq[buf], 0);
	a->frees++;
	free(p);
}

static int as_begin(void *ctx, const ds_tensor_ref *t, void **dst)
{
	async_sink *a = ctx;
	ds_wload_sink hs;
	ds_wload_host_sink(&a->h, &hs);
	return hs.tensor_begin(&a->h, t, dst);
}

static int as_chunk(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len, int buf)
{
	async_sink *a = ctx;
	assert_true(buf >= 0 && buf < 16 && a->nq[buf] < 256);
	a->q[buf][a->nq[buf]++] = (qcopy){ (uint8_t *)dst + off, src, len };
	return 0;
}

static int as_wait(void *ctx, int buf)
{
	async_sink *a = ctx;
	a->waits++;
	for (int i = 0; i < a->nq[buf]; i++)
		memcpy(a->q[buf][i].dst, a->q[buf][i].src, a->q[buf][i].len);
	a->nq[buf] = 0;
	return 0;
}

/* If the loader refilled a staging buffer before buffer_wait, or freed it
 * before the last wait, the deferred copies would read overwritten bytes. */
static void test_async_sink_contract(void **state)
{
	tmp *t = *state;
	for (int mode = 0; mode < 2; mode++) {
		ds_err e = { { 0 } };
		ds_weights *wd = NULL;
		assert_int_equal(ds_weights_open(t->dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
		async_sink *a = calloc(1, sizeof(*a));
		assert_int_equal(ds_wload_host_init(&a->h, wd), 0);
		ds_weights_free(wd);
		ds_wload_sink s = { .ctx = a, .alloc_staging = as_alloc, .free_staging = as_free,
				    .tensor_begin = as_begin, .chunk = as_chunk, .buffer_wait = as_wait };
		ds_wload_opts o = { .buf_bytes = mode ? 4096 : 16384, .n_bufs = mode ? 16 : 3,
				    .flags = mode ? DS_WLOAD_NO_URING : 0 };
		if (load_and_compare(t->dir, &o, &s, &a->h, NULL, &e))
			fail_msg("%s", e.msg);
		assert_int_equal(a->allocs, o.n_bufs);
		assert_int_equal(a->frees, o.n_bufs);
		assert_true(a->waits > o.n_bufs);
		ds_wload_host_free(&a->h);
		free(a);
	}
}

/* ---- injected faults ---- */

typedef struct fault {
	int mode;   /* 0 EIO, 1 short reads, 2 EINVAL (O_DIRECT refused at read), 3 EOF, 4 EAGAIN */
	int calls;
	int shard_seen;
} fault;

static int fault_fn(void *ctx, int shard, uint64_t off, unsigned len, int res)
{
	fault *f = ctx;
	f->calls++;
	switch (f->mode) {
	case 0:
		return f->calls == 5 ? -EIO : res;
	case 1: /* every other completion comes back short, at an odd length */
		return (f->calls & 1) && res > 5000 ? 5000 : res;
	case 2:
		return f->calls <= 3 ? -EINVAL : res;
	case 3:
		return f->calls == 4 ? 0 : res;
	default:
		return f->calls % 3 == 0 ? -EAGAIN : res;
	}
}

static void test_faults(void **state)
{
	tmp *t = *state;
	for (int io = 0; io < 2; io++) {
		for (int mode = 0; mode < 5; mode++) {
			fault f = { .mode = mode };
			ds_wload_opts o = SMALL;
			o.flags = io ? DS_WLOAD_NO_URING : 0;
			o.fault = fault_fn;
			o.fault_ctx = &f;
			ds_err e = { { 0 } };
			ds_wload_result r;
			int rc = load_and_compare(t->dir, &o, NULL, NULL, &r, &e);
			switch (mode) {
			case 0:
				assert_int_equal(rc, -EIO);
				assert_non_null(strstr(e.msg, "Input/output error"));
				assert_non_null(strstr(e.msg, t->dir));
				break;
			case 1:
			case 4:
				if (rc)
					fail_msg("mode %d: %s", mode, e.msg);
				assert_true(r.retries > 0);
				break;
			case 2:
				if (rc)
					fail_msg("mode %d: %s", mode, e.msg);
				assert_true(r.direct_refused);
				assert_true(r.buffered_shards >= 1);
				break;
			case 3:
				assert_int_equal(rc, -EIO);
				assert_non_null(strstr(e.msg, "truncated"));
				assert_non_null(strstr(e.msg, t->dir));
				break;
			}
		}
	}
}

/* ---- the files change under the loader ---- */

typedef struct hook_sink {
	ds_wload_host h;
	int what;         /* 0 truncate, 1 replace, 2 rewrite in place, 3 grow */
	int calls;
	char victim[700], spare[700];
} hook_sink;

static int hs_begin(void *ctx, const ds_tensor_ref *t, void **dst)
{
	hook_sink *k = ctx;
	ds_wload_sink hs;
	ds_wload_host_sink(&k->h, &hs);
	return hs.tensor_begin(&k->h, t, dst);
}

static int hs_chunk(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len, int buf)
{
	hook_sink *k = ctx;
	memcpy((uint8_t *)dst + off, src, len);
	if (k->calls++ != 0)
		return 0;
	if (k->what == 0) {
		/* Inside a read not yet issued (2 buffers of 32 KiB), unaligned. */
		assert_int_equal(truncate(k->victim, 70000), 0);
	} else if (k->what == 1) {
		assert_int_equal(rename(k->spare, k->victim), 0);
	} else if (k->what == 2) {
		int fd = open(k->victim, O_WRONLY);
		assert_true(fd >= 0);
		assert_int_equal(pwrite(fd, "xyz", 3, 100000), 3);
		close(fd);
	} else {
		int fd = open(k->victim, O_WRONLY | O_APPEND);
		assert_true(fd >= 0);
		assert_int_equal(write(fd, "tail", 4), 4);
		close(fd);
	}
	return 0;
}

static void test_file_changes_during_load(void **state)
{
	const char *expect[] = { "truncated", "replaced during the load", "changed during the load", "changed during the load" };
	for (int what = 0; what < 4; what++) {
		for (int buffered = 0; buffered < 2; buffered++) {
			char dir[512];
			assert_int_equal(fx_tmpdir(dir, sizeof(dir)), 0);
			write_model(dir, 3, 99);
			ds_err e = { { 0 } };
			ds_weights *wd = NULL;
			assert_int_equal(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
			hook_sink *k = calloc(1, sizeof(*k));
			k->what = what;
			/* The first chunk delivered is from the first shard opened. */
			snprintf(k->victim, sizeof(k->victim), "%s", shard_path(dir, 0, 3));
			snprintf(k->spare, sizeof(k->spare), "%s/spare", dir);
			assert_int_equal(fx_copy_file(k->victim, k->spare), 0);
			/* mtime an hour back, so a rewrite within the clock tick still shows. */
			struct timespec ts[2] = { { time(NULL) - 3600, 0 }, { time(NULL) - 3600, 0 } };
			assert_int_equal(utimensat(AT_FDCWD, k->victim, ts, 0), 0);
			assert_int_equal(ds_wload_host_init(&k->h, wd), 0);
			ds_wload_sink s = { .ctx = k, .tensor_begin = hs_begin, .chunk = hs_chunk };
			ds_wload_opts o = { .buf_bytes = 32768, .n_bufs = 2, .shards_in_flight = 1,
					    .flags = buffered ? DS_WLOAD_BUFFERED : 0 };
			int rc = ds_wload_run(wd, NULL, 0, &s, &o, NULL, NULL, &e);
			assert_true(rc < 0);
			if (getenv("DS_TEST_VERBOSE"))
				print_message("what %d buffered %d: %s\n", what, buffered, e.msg);
			assert_non_null(strstr(e.msg, k->victim));
			if (expect[what])
				assert_non_null(strstr(e.msg, expect[what]));
			ds_wload_host_free(&k->h);
			free(k);
			ds_weights_free(wd);
			fx_rmtree(dir);
		}
	}
}

/* Between ds_weights_open and the load: a shard of another size, a shard
 * whose header changed at the same size. */
static void test_changed_before_load(void **state)
{
	char dir[512];
	assert_int_equal(fx_tmpdir(dir, sizeof(dir)), 0);
	write_model(dir, 2, 5);
	ds_err e = { { 0 } };
	ds_weights *wd = NULL;
	ds_wload_host h;
	ds_wload_sink s;

	assert_int_equal(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	char victim[700];
	snprintf(victim, sizeof(victim), "%s", shard_path(dir, 1, 2));
	assert_int_equal(truncate(victim, 5000), 0);
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	ds_wload_host_sink(&h, &s);
	assert_int_equal(ds_wload_run(wd, NULL, 0, &s, &SMALL, NULL, NULL, &e), -ESTALE);
	assert_non_null(strstr(e.msg, victim));
	assert_non_null(strstr(e.msg, "changed since"));
	ds_wload_host_free(&h);
	ds_weights_free(wd);

	/* Rename a tensor in the header, same length: same size, other table. */
	write_model(dir, 2, 5);
	assert_int_equal(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	int fd = open(victim, O_RDWR);
	char hb[256];
	assert_int_equal(pread(fd, hb, sizeof(hb), 8), (ssize_t)sizeof(hb));
	char *p = strstr(hb, "s1.t0\"");
	assert_non_null(p);
	assert_int_equal(pwrite(fd, "q", 1, 8 + (p - hb)), 1);
	close(fd);
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	ds_wload_host_sink(&h, &s);
	assert_int_equal(ds_wload_run(wd, NULL, 0, &s, &SMALL, NULL, NULL, &e), -ESTALE);
	assert_non_null(strstr(e.msg, victim));
	assert_non_null(strstr(e.msg, "header differs"));
	ds_wload_host_free(&h);
	ds_weights_free(wd);
	fx_rmtree(dir);
}

/* An index naming a tensor its shard lacks, or a shard that is truncated:
 * the model does not open, and the message names the file. */
static void test_index_mismatch(void **state)
{
	char dir[512], path[700];
	assert_int_equal(fx_tmpdir(dir, sizeof(dir)), 0);
	write_model(dir, 2, 11);
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	FILE *f = fopen(path, "w");
	fprintf(f, "{\"weight_map\":{\"s0.t0\":\"model-00001-of-00002.safetensors\","
		   "\"s1.t99\":\"model-00002-of-00002.safetensors\"}}");
	fclose(f);
	ds_err e = { { 0 } };
	ds_weights *wd = NULL;
	assert_true(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e) < 0);
	assert_non_null(strstr(e.msg, "s1.t99"));
	assert_non_null(strstr(e.msg, "model-00002-of-00002.safetensors"));

	write_model(dir, 2, 11);
	assert_int_equal(truncate(shard_path(dir, 0, 2), 300), 0);
	assert_true(ds_weights_open(dir, DS_WEIGHTS_NO_MAP, &wd, &e) < 0);
	assert_non_null(strstr(e.msg, "model-00001-of-00002.safetensors"));
	fx_rmtree(dir);
}

/* ---- options, sink failures, progress from another thread ---- */

typedef struct fail_sink {
	int n;
	void *dst[256];
	char name[64];
} fail_sink;

static int fail_begin(void *ctx, const ds_tensor_ref *t, void **dst)
{
	fail_sink *f = ctx;
	if (f->n == 3) {
		snprintf(f->name, sizeof(f->name), "%s", t->name);
		return -ENOMEM;
	}
	*dst = f->dst[f->n++] = malloc(t->nbytes + 1);
	return 0;
}

static int fail_chunk(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len, int b)
{
	memcpy((uint8_t *)dst + off, src, len);
	return 0;
}

static void test_bad_options_and_sink(void **state)
{
	tmp *t = *state;
	ds_err e = { { 0 } };
	ds_weights *wd = NULL;
	assert_int_equal(ds_weights_open(t->dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	ds_wload_host h;
	ds_wload_sink s;
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	ds_wload_host_sink(&h, &s);
	ds_wload_opts o = { .buf_bytes = 1000 };
	assert_int_equal(ds_wload_run(wd, NULL, 0, &s, &o, NULL, NULL, &e), -EINVAL);
	o = (ds_wload_opts){ .n_bufs = 5000 };
	assert_int_equal(ds_wload_run(wd, NULL, 0, &s, &o, NULL, NULL, &e), -EINVAL);
	ds_wload_sink bad = s;
	bad.chunk = NULL;
	assert_int_equal(ds_wload_run(wd, NULL, 0, &bad, NULL, NULL, NULL, &e), -EINVAL);
	ds_wload_host_free(&h);

	/* The sink refuses the fourth tensor: the load stops, naming it; what
	 * the sink got before stays the sink's to free. */
	fail_sink fs = { 0 };
	ds_wload_sink f = { .ctx = &fs, .tensor_begin = fail_begin, .chunk = fail_chunk };
	assert_int_equal(ds_wload_run(wd, NULL, 0, &f, &SMALL, NULL, NULL, &e), -ENOMEM);
	assert_non_null(strstr(e.msg, fs.name));
	for (int i = 0; i < fs.n; i++)
		free(fs.dst[i]);
	ds_weights_free(wd);
}

typedef struct poll_arg {
	ds_wload_progress *p;
	_Atomic int stop;
	int samples, bad;
	uint64_t last;
} poll_arg;

static void *poller(void *arg)
{
	poll_arg *a = arg;
	while (!atomic_load(&a->stop)) {
		ds_wload_snapshot s;
		ds_wload_progress_read(a->p, &s);
		if (s.done < a->last || (s.total && s.done > s.total))
			a->bad++;
		a->last = s.done;
		a->samples++;
	}
	return NULL;
}

static void test_progress_thread(void **state)
{
	tmp *t = *state;
	ds_err e = { { 0 } };
	ds_weights *wd = NULL;
	assert_int_equal(ds_weights_open(t->dir, DS_WEIGHTS_NO_MAP, &wd, &e), 0);
	ds_wload_host h;
	ds_wload_sink s;
	assert_int_equal(ds_wload_host_init(&h, wd), 0);
	ds_wload_host_sink(&h, &s);
	ds_wload_progress prog = { 0 };
	poll_arg a = { .p = &prog };
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, poller, &a), 0);
	ds_wload_opts o = { .buf_bytes = 4096, .n_bufs = 2 };
	ds_wload_result r;
	assert_int_equal(ds_wload_run(wd, NULL, 0, &s, &o, &prog, &r, &e), 0);
	atomic_store(&a.stop, 1);
	pthread_join(th, NULL);
	assert_int_equal(a.bad, 0);
	assert_true(a.samples > 0);
	ds_wload_snapshot snap;
	ds_wload_progress_read(&prog, &snap);
	assert_true(snap.finished);
	assert_int_equal(snap.done, r.tensor_bytes);
	assert_true(snap.seconds > 0 && snap.bytes_per_s > 0);
	ds_wload_host_free(&h);
	ds_weights_free(wd);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_modes_match_mmap, setup_multi, teardown_tmp),
		cmocka_unit_test(test_single_file_model),
		cmocka_unit_test(test_fixture_models),
		cmocka_unit_test_setup_teardown(test_subset, setup_multi, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_async_sink_contract, setup_multi, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_faults, setup_multi, teardown_tmp),
		cmocka_unit_test(test_file_changes_during_load),
		cmocka_unit_test(test_changed_before_load),
		cmocka_unit_test(test_index_mismatch),
		cmocka_unit_test_setup_teardown(test_bad_options_and_sink, setup_multi, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_progress_thread, setup_multi, teardown_tmp),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
