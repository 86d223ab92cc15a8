#include "model/wload.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* O_DIRECT needs offsets, lengths and buffer addresses aligned to the logical
 * block size; 4096 covers 512- and 4096-byte devices. */
#define DIO_ALIGN 4096u
/* Tensors closer than this are read as one extent, gap included: one larger
 * read costs less than two requests. */
#define MERGE_GAP (256u << 10)
#define MAX_RETRIES 64

typedef struct tsel {
	const ds_tensor_ref *t;
	void *dst;
	uint64_t left;
	int begun;
} tsel;

typedef struct shard {
	int idx;
	const char *path;
	const ds_st_header *hdr;
	tsel **ts; /* selected tensors with bytes, by file offset */
	size_t nts;
	size_t scan;       /* first tensor not yet wholly behind the cursor */
	size_t next_ext;   /* first tensor of the next extent */
	uint64_t cur, ext_end;
	int fd;
	int direct;
	int state;         /* 0 unopened, 1 submitting, 2 all submitted, 3 closed */
	int outstanding;
	struct stat st0;
} shard;

typedef struct slot {
	shard *sh;
	uint64_t off;     /* file offset of the buffer's first byte (aligned) */
	unsigned need;    /* bytes from off that hold wanted data */
	unsigned len;     /* need rounded up to DIO_ALIGN */
	unsigned got;     /* bytes of [off, off+len) in the buffer so far */
	unsigned req_at;  /* where the request in flight starts, relative to off */
	size_t t0, t1;    /* sh->ts[t0..t1) overlap [off, off+need) */
	int direct;       /* the request in flight was issued with O_DIRECT */
	int retries;
	int used;         /* the sink copied out of it at least once */
} slot;

typedef struct pend {
	int slot;
	int res;
} pend;

typedef struct loader {
	const ds_weights *w;
	const ds_wload_sink *sink;
	ds_wload_opts o;
	ds_wload_progress *prog;
	ds_wload_result *res;
	ds_err *e;
	shard *shards;
	int nshards;
	int next_open;     /* next shard index to open */
	shard **active;    /* shards being submitted, round robin */
	int nactive, rr;
	slot *slots;
	void **bufs;
	int *freeq;        /* FIFO of free slot indices */
	int fq_head, fq_n;
	int inflight;
	struct io_uring ring;
	int have_ring, registered;
	pend *pending;     /* completions of the synchronous (no io_uring) path */
	int npending;
} loader;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void ds_wload_progress_read(const ds_wload_progress *p, ds_wload_snapshot *out)
{
	memset(out, 0, sizeof(*out));
	out->done = atomic_load_explicit(&p->done, memory_order_relaxed);
	out->total = atomic_load_explicit(&p->total, memory_order_relaxed);
	uint64_t s = atomic_load_explicit(&p->start_ns, memory_order_relaxed);
	uint64_t f = atomic_load_explicit(&p->end_ns, memory_order_relaxed);
	out->finished = f != 0;
	if (s) {
		out->seconds = (double)((f ? f : now_ns()) - s) * 1e-9;
		if (out->seconds > 0)
			out->bytes_per_s = (double)out->done / out->seconds;
	}
}

static int cmp_tsel(const void *a, const void *b)
{
	const tsel *x = *(tsel *const *)a, *y = *(tsel *const *)b;
	return x->t->file_offset < y->t->file_offset ? -1 : x->t->file_offset > y->t->file_offset;
}

/* The shard must still be the file whose header w parsed: same size, same
 * tensor table. Re-reading the header costs one small read per shard. */
static int check_header(loader *L, shard *sh)
{
	const ds_st_header *h = sh->hdr;
	if ((uint64_t)sh->st0.st_size != h->file_size)
		return ds_errf(L->e, -ESTALE, "%s: is %lld bytes, was %llu when the model was opened (changed since)",
			       sh->path, (long long)sh->st0.st_size, (unsigned long long)h->file_size);
	uint8_t *buf = malloc(h->data_start);
	if (!buf)
		return -ENOMEM;
	ssize_t r = pread(sh->fd, buf, h->data_start, 0);
	int rc = 0;
	ds_st_header now = { 0 };
	if (r != (ssize_t)h->data_start) {
		rc = ds_errf(L->e, r < 0 ? -errno : -EIO, "%s: cannot re-read its header", sh->path);
	} else if ((rc = ds_st_parse(buf, h->data_start, h->file_size, sh->path, &now, L->e)) == 0) {
		int same = now.n == h->n && now.data_start == h->data_start;
		for (size_t i = 0; same && i < h->n; i++) {
			const ds_st_tensor *a = &now.tensors[i], *b = &h->tensors[i];
			same = !strcmp(a->name, b->name) && a->dtype == b->dtype && a->begin == b->begin &&
			       a->end == b->end && a->ndim == b->ndim &&
			       !memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim);
		}
		if (!same)
			rc = ds_errf(L->e, -ESTALE, "%s: header differs from the one read when the model was opened",
				     sh->path);
		ds_st_header_free(&now);
	}
	free(buf);
	return rc;
}

static int shard_open(loader *L, shard *sh)
{
	sh->fd = open(sh->path, O_RDONLY | O_CLOEXEC);
	if (sh->fd < 0)
		return ds_errf(L->e, -errno, "%s: %s", sh->path, strerror(errno));
	sh->state = 1;
	if (fstat(sh->fd, &sh->st0) != 0)
		return ds_errf(L->e, -errno, "%s: %s", sh->path, strerror(errno));
	int rc = check_header(L, sh);
	if (rc)
		return rc;
	if (!(L->o.flags & DS_WLOAD_BUFFERED)) {
		int fl = fcntl(sh->fd, F_GETFL);
		if (fl >= 0 && fcntl(sh->fd, F_SETFL, fl | O_DIRECT) == 0)
			sh->direct = 1;
		else
			L->res->direct_refused = 1;
	}
	if (!sh->direct)
		L->res->buffered_shards++;
	return 0;
}

/* Refused at the first read (some filesystems accept the flag at open). */
static int shard_go_buffered(loader *L, shard *sh)
{
	if (!sh->direct)
		return 0;
	int fl = fcntl(sh->fd, F_GETFL);
	if (fl < 0 || fcntl(sh->fd, F_SETFL, fl & ~O_DIRECT) != 0)
		return ds_errf(L->e, -errno, "%s: cannot turn O_DIRECT off: %s", sh->path, strerror(errno));
	sh->direct = 0;
	L->res->direct_refused = 1;
	L->res->buffered_shards++;
	return 0;
}

/* Every read of the shard is done: it must be the same file, unchanged, or the
 * loaded bytes might mix two versions of the model. */
static int shard_close(loader *L, shard *sh)
{
	struct stat a, b;
	int rc = 0;
	if (fstat(sh->fd, &a) != 0)
		rc = ds_errf(L->e, -errno, "%s: %s", sh->path, strerror(errno));
	else if (a.st_size != sh->st0.st_size || a.st_mtim.tv_sec != sh->st0.st_mtim.tv_sec ||
		 a.st_mtim.tv_nsec != sh->st0.st_mtim.tv_nsec)
		rc = a.st_size != sh->st0.st_size
			? ds_errf(L->e, -ESTALE, "%s: changed during the load (%lld bytes at the start, %lld now)",
				  sh->path, (long long)sh->st0.st_size, (long long)a.st_size)
			: ds_errf(L->e, -ESTALE, "%s: changed during the load (written to: its mtime moved)", sh->path);
	else if (stat(sh->path, &b) != 0 || b.st_dev != a.st_dev || b.st_ino != a.st_ino)
		rc = ds_errf(L->e, -ESTALE, "%s: replaced during the load", sh->path);
	close(sh->fd);
	sh->fd = -1;
	sh->state = 3;
	return rc;
}

static int sink_begin(loader *L, tsel *s)
{
	s->begun = 1;
	int rc = L->sink->tensor_begin(L->sink->ctx, s->t, &s->dst);
	if (rc)
		return ds_errf(L->e, rc < 0 ? rc : -EIO, "tensor '%s': the sink refused it (%s)", s->t->name,
			       strerror(rc < 0 ? -rc : EIO));
	return 0;
}

static int sink_end(loader *L, tsel *s)
{
	L->res->tensors++;
	if (!L->sink->tensor_end)
		return 0;
	int rc = L->sink->tensor_end(L->sink->ctx, s->t, s->dst);
	return rc ? ds_errf(L->e, rc < 0 ? rc : -EIO, "tensor '%s': the sink failed to finish it", s->t->name) : 0;
}

/* Next read of a shard: at most buf_bytes from the cursor, inside the current
 * extent; returns 0 and fills the slot, or 1 when the shard is exhausted. */
static int shard_next(loader *L, shard *sh, slot *s)
{
	if (sh->cur >= sh->ext_end) {
		if (sh->next_ext >= sh->nts)
			return 1;
		size_t i = sh->next_ext;
		uint64_t a = sh->ts[i]->t->file_offset, end = a + sh->ts[i]->t->nbytes;
		for (i++; i < sh->nts && sh->ts[i]->t->file_offset <= end + MERGE_GAP; i++) {
			uint64_t te = sh->ts[i]->t->file_offset + sh->ts[i]->t->nbytes;
			end = te > end ? te : end;
		}
		sh->next_ext = i;
		sh->cur = a & ~(uint64_t)(DIO_ALIGN - 1);
		sh->ext_end = end;
	}
	uint64_t off = sh->cur;
	uint64_t stop = off + L->o.buf_bytes < sh->ext_end ? off + L->o.buf_bytes : sh->ext_end;
	sh->cur = stop;
	memset(s, 0, sizeof(*s));
	s->sh = sh;
	s->off = off;
	s->need = (unsigned)(stop - off);
	s->len = (s->need + DIO_ALIGN - 1) & ~(DIO_ALIGN - 1);
	while (sh->scan < sh->nts && sh->ts[sh->scan]->t->file_offset + sh->ts[sh->scan]->t->nbytes <= off)
		sh->scan++;
	s->t0 = sh->scan;
	size_t k = sh->scan;
	while (k < sh->nts && sh->ts[k]->t->file_offset < stop) {
		if (!sh->ts[k]->begun) {
			int rc = sink_begin(L, sh->ts[k]);
			if (rc)
				return rc;
		}
		k++;
	}
	s->t1 = k;
	return 0;
}

/* A free slot's next read: round robin over the shards being submitted,
 * opening the next shard when one runs out. 1: nothing left to read. */
static int next_chunk(loader *L, slot *s)
{
	for (;;) {
		while (L->nactive < L->o.shards_in_flight && L->next_open < L->nshards) {
			shard *sh = &L->shards[L->next_open++];
			if (sh->nts == 0)
				continue;
			int rc = shard_open(L, sh);
			if (rc)
				return rc;
			L->active[L->nactive++] = sh;
		}
		if (L->nactive == 0)
			return 1;
		int i = L->rr % L->nactive;
		shard *sh = L->active[i];
		int rc = shard_next(L, sh, s);
		if (rc < 0)
			return rc;
		if (rc == 0) {
			L->rr = i + 1;
			sh->outstanding++;
			return 0;
		}
		sh->state = 2;
		L->active[i] = L->active[--L->nactive];
		if (sh->outstanding == 0 && (rc = shard_close(L, sh)))
			return rc;
	}
}

static int issue(loader *L, int si)
{
	slot *s = &L->slots[si];
	shard *sh = s->sh;
	s->direct = sh->direct;
	s->req_at = s->direct ? s->got & ~(DIO_ALIGN - 1) : s->got;
	uint8_t *buf = (uint8_t *)L->bufs[si] + s->req_at;
	unsigned len = s->len - s->req_at;
	uint64_t off = s->off + s->req_at;
	if (!L->have_ring) {
		ssize_t r = pread(sh->fd, buf, len, (off_t)off);
		L->pending[L->npending++] = (pend){ si, r < 0 ? -errno : (int)r };
		return 0;
	}
	struct io_uring_sqe *sqe = io_uring_get_sqe(&L->ring);
	if (!sqe) {
		int rc = io_uring_submit(&L->ring);
		if (rc < 0)
			return ds_errf(L->e, rc, "io_uring_submit: %s", strerror(-rc));
		sqe = io_uring_get_sqe(&L->ring);
		if (!sqe)
			return ds_errf(L->e, -EBUSY, "io_uring: submission queue full");
	}
	if (L->registered)
		io_uring_prep_read_fixed(sqe, sh->fd, buf, len, off, si);
	else
		io_uring_prep_read(sqe, sh->fd, buf, len, off);
	io_uring_sqe_set_data64(sqe, (uint64_t)si);
	return 0;
}

static int deliver(loader *L, int si)
{
	slot *s = &L->slots[si];
	shard *sh = s->sh;
	const uint8_t *buf = L->bufs[si];
	uint64_t end = s->off + s->need, sent = 0;
	for (size_t k = s->t0; k < s->t1; k++) {
		tsel *t = sh->ts[k];
		uint64_t to = t->t->file_offset, te = to + t->t->nbytes;
		uint64_t a = to > s->off ? to : s->off, b = te < end ? te : end;
		if (a >= b)
			continue;
		int rc = L->sink->chunk(L->sink->ctx, t->t, t->dst, (size_t)(a - to), buf + (a - s->off),
					(size_t)(b - a), si);
		if (rc)
			return ds_errf(L->e, rc < 0 ? rc : -EIO, "tensor '%s': the sink failed to take bytes %llu..%llu",
				       t->t->name, (unsigned long long)(a - to), (unsigned long long)(b - to));
		s->used = 1;
		sent += b - a;
		t->left -= b - a;
		if (t->left == 0 && (rc = sink_end(L, t)))
			return rc;
	}
	L->res->tensor_bytes += sent;
	if (L->prog)
		atomic_fetch_add_explicit(&L->prog->done, sent, memory_order_relaxed);
	return 0;
}

/* One completed read. Returns 0 when the slot is free again, 1 when it was
 * resubmitted, or a negative errno. */
static int complete(loader *L, int si, int res)
{
	slot *s = &L->slots[si];
	shard *sh = s->sh;
	uint64_t at = s->off + s->req_at;
	if (L->o.fault)
		res = L->o.fault(L->o.fault_ctx, sh->idx, at, s->len - s->req_at, res);
	if (res == -EINVAL && s->direct) {
		int rc = shard_go_buffered(L, sh);
		if (!rc)
			rc = issue(L, si);
		return rc ? rc : 1;
	}
	if (res == -EAGAIN || res == -EINTR) {
		if (++s->retries > MAX_RETRIES)
			return ds_errf(L->e, res, "%s: read at offset %llu keeps failing: %s", sh->path,
				       (unsigned long long)at, strerror(-res));
		L->res->retries++;
		int rc = issue(L, si);
		return rc ? rc : 1;
	}
	if (res < 0)
		return ds_errf(L->e, res, "%s: read of %u bytes at offset %llu: %s", sh->path, s->len - s->req_at,
			       (unsigned long long)at, strerror(-res));
	L->res->read_bytes += (uint64_t)res;
	/* An O_DIRECT retry restarts at the block boundary below what we had:
	 * coming back with no more than before means the file ends there. */
	if (res == 0 || s->req_at + (unsigned)res <= s->got) {
		struct stat st;
		long long size = fstat(sh->fd, &st) == 0 ? (long long)st.st_size : -1;
		return ds_errf(L->e, -EIO, "%s: ends before byte %llu, tensor data runs to %llu (truncated? %lld bytes now)",
			       sh->path, (unsigned long long)(at + (uint64_t)res),
			       (unsigned long long)(s->off + s->need), size);
	}
	if ((unsigned)res > s->len - s->req_at)
		return ds_errf(L->e, -EIO, "%s: read at offset %llu returned more than asked", sh->path,
			       (unsigned long long)at);
	s->got = s->req_at + (unsigned)res;
	if (s->got < s->need) {
		if (++s->retries > MAX_RETRIES)
			return ds_errf(L->e, -EIO, "%s: too many short reads at offset %llu", sh->path,
				       (unsigned long long)at);
		L->res->retries++;
		int rc = issue(L, si);
		return rc ? rc : 1;
	}
	int rc = deliver(L, si);
	if (rc)
		return rc;
	if (--sh->outstanding == 0 && sh->state == 2)
		return shard_close(L, sh);
	return 0;
}

static int plan(loader *L, const ds_tensor_ref *const *refs, size_t n, tsel **out_sel)
{
	const ds_weights *w = L->w;
	size_t count = refs ? n : ds_weights_count(w);
	L->nshards = ds_weights_shard_count(w);
	L->shards = calloc((size_t)L->nshards, sizeof(shard));
	tsel *sel = calloc(count ? count : 1, sizeof(tsel));
	tsel **ptrs = calloc(count ? count : 1, sizeof(tsel *));
	*out_sel = sel;
	if (!L->shards || !sel || !ptrs) {
		free(ptrs);
		return -ENOMEM;
	}
	uint64_t total = 0;
	for (int i = 0; i < L->nshards; i++) {
		L->shards[i] = (shard){ .idx = i, .fd = -1, .path = ds_weights_shard_path(w, i),
					.hdr = ds_weights_shard_header(w, i) };
	}
	size_t np = 0;
	for (size_t i = 0; i < count; i++) {
		const ds_tensor_ref *t = refs ? refs[i] : ds_weights_at(w, i);
		if (!t || t->shard < 0 || t->shard >= L->nshards) {
			free(ptrs);
			return ds_errf(L->e, -EINVAL, "tensor #%zu: not a tensor of this model", i);
		}
		sel[i] = (tsel){ .t = t, .left = t->nbytes };
		total += t->nbytes;
		if (t->nbytes)
			ptrs[np++] = &sel[i];
	}
	/* Group by shard, then by offset: one array, each shard a slice. */
	for (size_t i = 0; i < np; i++)
		L->shards[ptrs[i]->t->shard].nts++;
	size_t at = 0;
	for (int i = 0; i < L->nshards; i++) {
		L->shards[i].ts = ptrs + at;
		at += L->shards[i].nts;
		L->shards[i].nts = 0;
	}
	tsel **tmp = malloc((np ? np : 1) * sizeof(tsel *));
	if (!tmp) {
		free(ptrs);
		return -ENOMEM;
	}
	memcpy(tmp, ptrs, np * sizeof(tsel *));
	for (size_t i = 0; i < np; i++) {
		shard *sh = &L->shards[tmp[i]->t->shard];
		sh->ts[sh->nts++] = tmp[i];
	}
	free(tmp);
	for (int i = 0; i < L->nshards; i++) {
		shard *sh = &L->shards[i];
		qsort(sh->ts, sh->nts, sizeof(tsel *), cmp_tsel);
		for (size_t k = 0; k < sh->nts; k++) {
			const ds_tensor_ref *t = sh->ts[k]->t;
			if (t->file_offset + t->nbytes > sh->hdr->file_size)
				return ds_errf(L->e, -EINVAL, "%s: tensor '%s' lies past the end of the file", sh->path,
					       t->name);
			if (k && t->file_offset < sh->ts[k - 1]->t->file_offset + sh->ts[k - 1]->t->nbytes)
				return ds_errf(L->e, -EINVAL, "tensor '%s' is listed twice or overlaps '%s'", t->name,
					       sh->ts[k - 1]->t->name);
		}
		if (sh->nts)
			L->res->shards++;
	}
	if (L->prog)
		atomic_store_explicit(&L->prog->total, total, memory_order_relaxed);
	/* Empty tensors need no read. */
	for (size_t i = 0; i < count; i++) {
		if (sel[i].t->nbytes == 0) {
			int rc = sink_begin(L, &sel[i]);
			if (rc || (rc = sink_end(L, &sel[i])))
				return rc;
		}
	}
	return 0;
}

static int opts_check(ds_wload_opts *o, ds_err *e)
{
	if (!o->buf_bytes)
		o->buf_bytes = 4u << 20;
	if (!o->n_bufs)
		o->n_bufs = 16;
	if (!o->shards_in_flight)
		o->shards_in_flight = 2;
	if (o->buf_bytes % DIO_ALIGN || o->buf_bytes > (1u << 30))
		return ds_errf(e, -EINVAL, "wload: staging buffer size %zu is not a multiple of %u up to 1 GiB",
			       o->buf_bytes, DIO_ALIGN);
	if (o->n_bufs < 1 || o->n_bufs > 1024)
		return ds_errf(e, -EINVAL, "wload: %d staging buffers (1..1024)", o->n_bufs);
	if (o->shards_in_flight < 1 || o->shards_in_flight > 1024)
		return ds_errf(e, -EINVAL, "wload: %d shards in flight (1..1024)", o->shards_in_flight);
	return 0;
}

static int setup_io(loader *L)
{
	int nb = L->o.n_bufs;
	L->slots = calloc((size_t)nb, sizeof(slot));
	L->bufs = calloc((size_t)nb, sizeof(void *));
	L->freeq = calloc((size_t)nb, sizeof(int));
	L->pending = calloc((size_t)nb, sizeof(pend));
	L->active = calloc((size_t)L->o.shards_in_flight, sizeof(shard *));
	if (!L->slots || !L->bufs || !L->freeq || !L->pending || !L->active)
		return -ENOMEM;
	for (int i = 0; i < nb; i++) {
		int rc;
		if (L->sink->alloc_staging) {
			rc = L->sink->alloc_staging(L->sink->ctx, L->o.buf_bytes, i, &L->bufs[i]);
			if (!rc && ((uintptr_t)L->bufs[i] % DIO_ALIGN))
				rc = -EINVAL;
		} else {
			rc = -posix_memalign(&L->bufs[i], DIO_ALIGN, L->o.buf_bytes);
		}
		if (rc) {
			L->bufs[i] = NULL;
			return ds_errf(L->e, rc < 0 ? rc : -ENOMEM, "wload: cannot get a %zu-byte aligned staging buffer",
				       L->o.buf_bytes);
		}
		L->freeq[i] = i;
	}
	L->fq_n = nb;
	if (!(L->o.flags & DS_WLOAD_NO_URING)) {
		/* Newer kernels run completions on our thread only when we wait:
		 * cheaper; older ones refuse the flags, so retry without. */
		int rc = io_uring_queue_init((unsigned)nb, &L->ring,
					     IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN);
		if (rc == -EINVAL)
			rc = io_uring_queue_init((unsigned)nb, &L->ring, 0);
		L->have_ring = rc == 0;
	}
	L->res->io_uring = L->have_ring;
	if (L->have_ring && !(L->o.flags & DS_WLOAD_NO_REGISTER)) {
		struct iovec *iov = calloc((size_t)nb, sizeof(*iov));
		if (!iov)
			return -ENOMEM;
		for (int i = 0; i < nb; i++)
			iov[i] = (struct iovec){ L->bufs[i], L->o.buf_bytes };
		/* Refused past RLIMIT_MEMLOCK: plain reads still work. */
		L->registered = io_uring_register_buffers(&L->ring, iov, (unsigned)nb) == 0;
		free(iov);
	}
	L->res->registered = L->registered;
	return 0;
}

/* Waits for at least one completion (or takes the synchronous ones) and
 * handles each; stops handling at the first error but consumes all. */
static int reap(loader *L, int err)
{
	if (!L->have_ring) {
		pend p[1024];
		int np = L->npending;
		memcpy(p, L->pending, sizeof(pend) * (size_t)np);
		L->npending = 0;
		for (int i = 0; i < np; i++) {
			int rc = err ? 0 : complete(L, p[i].slot, p[i].res);
			if (rc == 1)
				continue;
			L->inflight--;
			L->freeq[(L->fq_head + L->fq_n++) % L->o.n_bufs] = p[i].slot;
			if (rc < 0 && !err)
				err = rc;
		}
		return err;
	}
	int rc = io_uring_submit_and_wait(&L->ring, 1);
	if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
		return err ? err : ds_errf(L->e, rc, "io_uring: %s", strerror(-rc));
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	io_uring_for_each_cqe(&L->ring, head, cqe) {
		seen++;
		int si = (int)cqe->user_data;
		int r = err ? 0 : complete(L, si, cqe->res);
		if (r == 1)
			continue;
		L->inflight--;
		L->freeq[(L->fq_head + L->fq_n++) % L->o.n_bufs] = si;
		if (r < 0 && !err)
			err = r;
	}
	io_uring_cq_advance(&L->ring, seen);
	return err;
}

static int run(loader *L)
{
	int err = 0;
	for (;;) {
		while (!err && L->fq_n > 0) {
			int si = L->freeq[L->fq_head];
			slot *s = &L->slots[si];
			if (s->used && L->sink->buffer_wait) {
				int rc = L->sink->buffer_wait(L->sink->ctx, si);
				if (rc) {
					err = ds_errf(L->e, rc < 0 ? rc : -EIO, "wload: the sink failed on staging buffer %d", si);
					break;
				}
			}
			int used = s->used;
			int rc = next_chunk(L, s);
			s->used = used;
			if (rc == 1)
				break;
			if (rc < 0 || (rc = issue(L, si))) {
				err = rc;
				break;
			}
			L->fq_head = (L->fq_head + 1) % L->o.n_bufs;
			L->fq_n--;
			L->inflight++;
		}
		if (L->inflight == 0)
			break;
		err = reap(L, err);
	}
	return err;
}

int ds_wload_run(const ds_weights *w, const ds_tensor_ref *const *refs, size_t n, const ds_wload_sink *sink,
		 const ds_wload_opts *opts, ds_wload_progress *progress, ds_wload_result *result, ds_err *e)
{
	ds_wload_result res_local;
	loader L = { .w = w, .sink = sink, .prog = progress, .res = result ? result : &res_local, .e = e };
	memset(L.res, 0, sizeof(*L.res));
	if (opts)
		L.o = *opts;
	if (!w || !sink || !sink->tensor_begin || !sink->chunk)
		return ds_errf(e, -EINVAL, "wload: no model or an incomplete sink");
	int rc = opts_check(&L.o, e);
	if (rc)
		return rc;
	if (progress) {
		atomic_store_explicit(&progress->done, 0, memory_order_relaxed);
		atomic_store_explicit(&progress->end_ns, 0, memory_order_relaxed);
	}
	uint64_t t0 = now_ns();
	tsel *sel = NULL;
	rc = plan(&L, refs, n, &sel);
	if (!rc)
		rc = setup_io(&L);
	if (progress)
		atomic_store_explicit(&progress->start_ns, t0, memory_order_relaxed);
	if (!rc)
		rc = run(&L);
	/* Teardown: no read is in flight (run drains), copies out of staging
	 * must finish before the buffers go. */
	if (L.have_ring) {
		if (L.registered)
			io_uring_unregister_buffers(&L.ring);
		io_uring_queue_exit(&L.ring);
	}
	for (int i = 0; L.bufs && i < L.o.n_bufs; i++) {
		if (!L.bufs[i])
			continue;
		if (L.slots[i].used && sink->buffer_wait) {
			int r = sink->buffer_wait(sink->ctx, i);
			if (r && !rc)
				rc = ds_errf(e, r < 0 ? r : -EIO, "wload: the sink failed on staging buffer %d", i);
		}
		if (sink->alloc_staging) {
			if (sink->free_staging)
				sink->free_staging(sink->ctx, L.bufs[i], i);
		} else {
			free(L.bufs[i]);
		}
	}
	for (int i = 0; L.shards && i < L.nshards; i++)
		if (L.shards[i].fd >= 0)
			close(L.shards[i].fd);
	if (L.nshards && L.shards)
		free(L.shards[0].ts);
	free(L.shards);
	free(sel);
	free(L.slots);
	free(L.bufs);
	free(L.freeq);
	free(L.pending);
	free(L.active);
	uint64_t t1 = now_ns();
	L.res->seconds = (double)(t1 - t0) * 1e-9;
	if (progress)
		atomic_store_explicit(&progress->end_ns, t1 > t0 ? t1 : t0 + 1, memory_order_relaxed);
	return rc;
}

/* ---- host-memory sink ---- */

static int host_index(const ds_wload_host *h, const ds_tensor_ref *t, size_t *idx)
{
	const ds_tensor_ref *base = ds_weights_at(h->w, 0);
	if (!base || t < base || (size_t)(t - base) >= h->n || ds_weights_at(h->w, (size_t)(t - base)) != t)
		return -EINVAL;
	*idx = (size_t)(t - base);
	return 0;
}

static int host_begin(void *ctx, const ds_tensor_ref *t, void **dst)
{
	ds_wload_host *h = ctx;
	size_t i;
	if (host_index(h, t, &i))
		return -EINVAL;
	free(h->data[i]);
	h->data[i] = malloc(t->nbytes ? t->nbytes : 1);
	*dst = h->data[i];
	return h->data[i] ? 0 : -ENOMEM;
}

static int host_chunk(void *ctx, const ds_tensor_ref *t, void *dst, size_t off, const void *src, size_t len, int buf)
{
	memcpy((uint8_t *)dst + off, src, len);
	return 0;
}

int ds_wload_host_init(ds_wload_host *h, const ds_weights *w)
{
	h->w = w;
	h->n = ds_weights_count(w);
	h->data = calloc(h->n ? h->n : 1, sizeof(void *));
	return h->data ? 0 : -ENOMEM;
}

void ds_wload_host_sink(ds_wload_host *h, ds_wload_sink *out)
{
	*out = (ds_wload_sink){ .ctx = h, .tensor_begin = host_begin, .chunk = host_chunk };
}

void ds_wload_host_free(ds_wload_host *h)
{
	for (size_t i = 0; h->data && i < h->n; i++)
		free(h->data[i]);
	free(h->data);
	h->data = NULL;
	h->n = 0;
}
