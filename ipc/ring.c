#include "ipc/ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct ds_ring_writer {
	ds_ring_hdr *h;
	uint8_t *data;
	uint64_t size, mask;
	uint64_t wpos; /* appended */
	uint64_t pub;  /* published */
	int memfd, efd;
	size_t map_len;
};

struct ds_ring_reader {
	ds_ring_hdr *h;
	uint8_t *data;
	uint64_t size, mask;
	uint64_t rpos;
	uint32_t pending; /* bytes of the event handed out, consumed at the next call */
	int memfd, efd;
	size_t map_len;
};

static size_t align8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

int ds_ring_create(size_t data_size, ds_ring_writer **out)
{
	if (data_size < 4096 || data_size > (1u << 30) || (data_size & (data_size - 1)))
		return -EINVAL;
	ds_ring_writer *w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->memfd = w->efd = -1;
	int rc;
	w->memfd = memfd_create("dsd-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (w->memfd < 0)
		goto fail_errno;
	w->map_len = DS_RING_HDR_SIZE + data_size;
	if (ftruncate(w->memfd, (off_t)w->map_len) < 0)
		goto fail_errno;
	/* The client cannot shrink the file under us (SIGBUS) or grow it. */
	if (fcntl(w->memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		goto fail_errno;
	void *p = mmap(NULL, w->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, w->memfd, 0);
	if (p == MAP_FAILED)
		goto fail_errno;
	w->h = p;
	w->data = (uint8_t *)p + DS_RING_HDR_SIZE;
	w->size = data_size;
	w->mask = data_size - 1;
	w->h->magic = DS_RING_MAGIC;
	w->h->version = DS_RING_VERSION;
	w->h->hdr_size = DS_RING_HDR_SIZE;
	w->h->data_size = (uint32_t)data_size;
	w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->efd < 0)
		goto fail_errno;
	*out = w;
	return 0;
fail_errno:
	rc = -errno;
	ds_ring_writer_free(w);
	return rc;
}

ds_ring_writer *ds_ring_writer_free(ds_ring_writer *w)
{
	if (!w)
		return NULL;
	if (w->h)
		munmap(w->h, w->map_len);
	if (w->memfd >= 0)
		close(w->memfd);
	if (w->efd >= 0)
		close(w->efd);
	free(w);
	return NULL;
}

int ds_ring_writer_fds(const ds_ring_writer *w, int *memfd, int *efd)
{
	*memfd = w->memfd;
	*efd = w->efd;
	return 0;
}

size_t ds_ring_event_size(const ds_ring_event *ev)
{
	return align8(sizeof(ds_ring_rec) + (ev->type == DS_REC_FINAL ? sizeof(ds_ring_stats) : 0) +
		      sizeof(ds_ring_top) * (size_t)ev->n_top + ev->text_len);
}

long ds_ring_room(ds_ring_writer *w)
{
	uint64_t rp = __atomic_load_n(&w->h->read_pos, __ATOMIC_ACQUIRE);
	/* The reader may only have consumed what was published, in records. */
	if (w->pub - rp > w->size || (rp & 7))
		return -EPROTO;
	return (long)(w->size - (w->wpos - rp));
}

int ds_ring_put(ds_ring_writer *w, const ds_ring_event *ev)
{
	if (ev->text_len > DS_RING_MAX_TEXT || ev->n_top < 0 || ev->n_top > (int)DS_RING_MAX_TOP)
		return -E2BIG;
	size_t need = ds_ring_event_size(ev);
	long room = ds_ring_room(w);
	if (room < 0)
		return (int)room;
	uint64_t off = w->wpos & w->mask, tail = w->size - off;
	uint64_t total = need + (tail < need ? tail : 0);
	if ((uint64_t)room < total) {
		/* Dekker with the reader (stores read_pos, then reads the flag):
		 * either we see its progress now or it sees the flag. */
		__atomic_store_n(&w->h->writer_waiting, 1, __ATOMIC_SEQ_CST);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		room = ds_ring_room(w);
		if (room < 0)
			return (int)room;
		if ((uint64_t)room < total)
			return -EAGAIN;
	}
	if (tail < need) { /* records never wrap: pad to the end */
		ds_ring_rec pad = { .size = (uint32_t)tail, .type = DS_REC_PAD };
		memcpy(w->data + off, &pad, 8);
		w->wpos += tail;
		off = 0;
	}
	uint8_t *p = w->data + off;
	ds_ring_rec r = {
		.size = (uint32_t)need, .type = (uint16_t)ev->type, .finish = (uint8_t)ev->finish,
		.n_top = (uint8_t)ev->n_top, .request_id = ev->request_id, .seq = ev->seq, .token = ev->token,
		.logprob = ev->logprob, .text_len = ev->text_len,
	};
	memcpy(p, &r, sizeof(r));
	p += sizeof(r);
	if (ev->type == DS_REC_FINAL) {
		ds_ring_stats z = { 0 };
		memcpy(p, ev->stats ? ev->stats : &z, sizeof(z));
		p += sizeof(z);
	}
	if (ev->n_top) {
		memcpy(p, ev->top, sizeof(ds_ring_top) * (size_t)ev->n_top);
		p += sizeof(ds_ring_top) * (size_t)ev->n_top;
	}
	if (ev->text_len)
		memcpy(p, ev->text, ev->text_len);
	w->wpos += need;
	return 0;
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
	return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

int ds_ring_publish(ds_ring_writer *w)
{
	if (w->wpos == w->pub)
		return 0;
	__atomic_store_n(&w->h->write_pos, w->wpos, __ATOMIC_RELEASE);
	w->pub = w->wpos;
	/* Pairs with the reader's fence between marking itself asleep and
	 * re-reading write_pos: one of the two sides sees the other. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!__atomic_load_n(&w->h->reader_sleep, __ATOMIC_RELAXED))
		return 0;
	uint32_t how = __atomic_exchange_n(&w->h->reader_sleep, 0, __ATOMIC_SEQ_CST);
	if (how == 1) {
		__atomic_fetch_add(&w->h->futex, 1, __ATOMIC_SEQ_CST);
		futex(&w->h->futex, FUTEX_WAKE, 1, NULL); /* shared mapping: not FUTEX_PRIVATE */
		return 1;
	}
	if (how == 2) {
		uint64_t one = 1;
		ssize_t r = write(w->efd, &one, sizeof(one));
		(void)r; /* EAGAIN: the counter is already non-zero, the reader will wake */
		return 1;
	}
	return 0;
}

int ds_ring_attach(int memfd, int efd, ds_ring_reader **out)
{
	struct stat st;
	if (fstat(memfd, &st) < 0)
		return -errno;
	if (st.st_size < (off_t)DS_RING_HDR_SIZE + 4096 || st.st_size > (off_t)DS_RING_HDR_SIZE + (1 << 30))
		return -EPROTO;
	size_t len = (size_t)st.st_size;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (p == MAP_FAILED)
		return -errno;
	ds_ring_hdr *h = p;
	uint64_t ds = h->data_size;
	if (h->magic != DS_RING_MAGIC || h->version != DS_RING_VERSION || h->hdr_size != DS_RING_HDR_SIZE ||
	    ds + DS_RING_HDR_SIZE != len || (ds & (ds - 1))) {
		munmap(p, len);
		return -EPROTO;
	}
	ds_ring_reader *r = calloc(1, sizeof(*r));
	if (!r) {
		munmap(p, len);
		return -ENOMEM;
	}
	r->h = h;
	r->data = (uint8_t *)p + DS_RING_HDR_SIZE;
	r->size = ds;
	r->mask = ds - 1;
	r->map_len = len;
	r->memfd = memfd;
	r->efd = efd;
	r->rpos = __atomic_load_n(&h->read_pos, __ATOMIC_ACQUIRE);
	*out = r;
	return 0;
}

ds_ring_reader *ds_ring_reader_free(ds_ring_reader *r)
{
	if (!r)
		return NULL;
	munmap(r->h, r->map_len);
	if (r->memfd >= 0)
		close(r->memfd);
	if (r->efd >= 0)
		close(r->efd);
	free(r);
	return NULL;
}

static void consume(ds_ring_reader *r, uint64_t n)
{
	r->rpos += n;
	__atomic_store_n(&r->h->read_pos, r->rpos, __ATOMIC_RELEASE);
}

int ds_ring_next(ds_ring_reader *r, ds_ring_event *ev)
{
	if (r->pending) {
		consume(r, r->pending);
		r->pending = 0;
	}
	for (;;) {
		uint64_t wp = __atomic_load_n(&r->h->write_pos, __ATOMIC_ACQUIRE);
		if (wp == r->rpos)
			return 0;
		uint64_t avail = wp - r->rpos, off = r->rpos & r->mask;
		if (avail > r->size || avail < 8)
			return -EPROTO;
		ds_ring_rec rec;
		memcpy(&rec, r->data + off, 8);
		if (rec.size < 8 || (rec.size & 7) || rec.size > avail || rec.size > r->size - off)
			return -EPROTO;
		if (rec.type == DS_REC_PAD) {
			consume(r, rec.size);
			continue;
		}
		if (rec.size < sizeof(rec))
			return -EPROTO;
		memcpy(&rec, r->data + off, sizeof(rec));
		if (rec.type != DS_REC_TOKEN && rec.type != DS_REC_FINAL)
			return -EPROTO;
		const uint8_t *p = r->data + off + sizeof(rec);
		size_t body = (rec.type == DS_REC_FINAL ? sizeof(ds_ring_stats) : 0) +
			      sizeof(ds_ring_top) * rec.n_top + (size_t)rec.text_len;
		if (rec.n_top > DS_RING_MAX_TOP || rec.text_len > DS_RING_MAX_TEXT || sizeof(rec) + body > rec.size)
			return -EPROTO;
		memset(ev, 0, sizeof(*ev));
		ev->type = rec.type;
		ev->finish = rec.finish;
		ev->request_id = rec.request_id;
		ev->seq = rec.seq;
		ev->token = rec.token;
		ev->logprob = rec.logprob;
		if (rec.type == DS_REC_FINAL) {
			ev->stats = (const ds_ring_stats *)p;
			p += sizeof(ds_ring_stats);
		}
		ev->n_top = rec.n_top;
		ev->top = rec.n_top ? (const ds_ring_top *)p : NULL;
		p += sizeof(ds_ring_top) * rec.n_top;
		ev->text = (const char *)p;
		ev->text_len = rec.text_len;
		r->pending = rec.size;
		return 1;
	}
}

/* Something to do instead of sleeping: records, or a paused writer that
 * needs to hear that we read. */
static int has_data(ds_ring_reader *r)
{
	return __atomic_load_n(&r->h->write_pos, __ATOMIC_ACQUIRE) != r->rpos + r->pending ||
	       __atomic_load_n(&r->h->writer_waiting, __ATOMIC_RELAXED);
}

int ds_ring_wait(ds_ring_reader *r, int timeout_ms)
{
	uint32_t v = __atomic_load_n(&r->h->futex, __ATOMIC_ACQUIRE);
	__atomic_store_n(&r->h->reader_sleep, 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (has_data(r)) {
		__atomic_store_n(&r->h->reader_sleep, 0, __ATOMIC_RELAXED);
		return 0;
	}
	struct timespec ts = { timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L };
	long rc = futex(&r->h->futex, FUTEX_WAIT, v, timeout_ms < 0 ? NULL : &ts);
	int err = rc < 0 ? errno : 0;
	__atomic_store_n(&r->h->reader_sleep, 0, __ATOMIC_RELAXED);
	if (err == ETIMEDOUT)
		return has_data(r) ? 0 : -ETIMEDOUT;
	if (err == EINTR)
		return -EINTR;
	return 0; /* woken, or EAGAIN: the word changed before we slept */
}

int ds_ring_arm(ds_ring_reader *r)
{
	__atomic_store_n(&r->h->reader_sleep, 2, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (has_data(r)) {
		__atomic_store_n(&r->h->reader_sleep, 0, __ATOMIC_RELAXED);
		return 1;
	}
	return 0;
}

void ds_ring_disarm(ds_ring_reader *r)
{
	uint64_t v;
	ssize_t n = read(r->efd, &v, sizeof(v));
	(void)n;
	__atomic_store_n(&r->h->reader_sleep, 0, __ATOMIC_RELAXED);
}

int ds_ring_reader_efd(const ds_ring_reader *r)
{
	return r->efd;
}

int ds_ring_take_writer_waiting(ds_ring_reader *r)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST); /* our read_pos store before the flag's load */
	if (!__atomic_load_n(&r->h->writer_waiting, __ATOMIC_RELAXED))
		return 0;
	return __atomic_exchange_n(&r->h->writer_waiting, 0, __ATOMIC_SEQ_CST) != 0;
}
