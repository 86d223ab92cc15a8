/* ring.h — the per-client token ring: a sealed memfd shared by the daemon
 * (the only writer) and one client (the only reader). Records are written
 * without a system call; the reader is woken (futex, or an eventfd for
 * poll-based readers) only when it said it sleeps. The reader's writable
 * words are untrusted: the writer validates read_pos on every use.
 * A writer belongs to one thread (the engine's), a reader to one client. */
#ifndef DS_IPC_RING_H
#define DS_IPC_RING_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#define DS_RING_MAGIC 0x47525344u /* "DSRG" little-endian */
#define DS_RING_VERSION 1u
#define DS_RING_HDR_SIZE 4096u
#define DS_RING_MAX_TEXT 4096u
#define DS_RING_MAX_TOP 32u

/* The header page. Cache lines separate what each side writes. */
typedef struct ds_ring_hdr {
	uint32_t magic, version, hdr_size, data_size; /* written once by the daemon */
	uint8_t _pad0[48];
	uint64_t write_pos;      /* daemon: bytes published (monotonic) */
	uint32_t futex;          /* daemon: bumped on each wake */
	uint32_t writer_waiting; /* daemon: 1 when a stream paused on a full ring */
	uint8_t _pad1[48];
	uint64_t read_pos;       /* client: bytes consumed (monotonic) */
	uint32_t reader_sleep;   /* client: 0 awake, 1 futex wait, 2 wants the eventfd */
	uint32_t _pad2;
	uint8_t _pad3[48];
} ds_ring_hdr;
static_assert(sizeof(ds_ring_hdr) == 192, "ring header layout");
static_assert(offsetof(ds_ring_hdr, write_pos) == 64, "ring header layout");
static_assert(offsetof(ds_ring_hdr, read_pos) == 128, "ring header layout");

enum { DS_REC_TOKEN = 1, DS_REC_FINAL = 2, DS_REC_PAD = 0xffff };
/* Finish reasons (final records; also the protocol's strings). */
enum { DS_FINISH_NONE = 0, DS_FINISH_STOP = 1, DS_FINISH_LENGTH = 2, DS_FINISH_CANCELLED = 3, DS_FINISH_ERROR = 4 };

/* A record: this header, then the stats (final records), then n_top
 * alternatives, then text_len bytes of UTF-8, padded to 8 bytes. */
typedef struct ds_ring_rec {
	uint32_t size;       /* whole record, a multiple of 8 */
	uint16_t type;       /* DS_REC_* */
	uint8_t finish;      /* DS_FINISH_* (final records) */
	uint8_t n_top;
	uint64_t request_id;
	uint32_t seq;        /* 0, 1, ... per request */
	int32_t token;       /* -1 when none (a final record) */
	float logprob;       /* NaN when not asked for */
	uint32_t text_len;
} ds_ring_rec;
static_assert(sizeof(ds_ring_rec) == 32, "ring record layout");

typedef struct ds_ring_stats {
	uint32_t prompt_tokens, generated_tokens, cached_tokens, drafted, accepted, _pad;
	uint64_t ttft_ns, total_ns, prefill_ns, decode_ns; /* decode: after the first token */
	uint64_t _reserved;
} ds_ring_stats;
static_assert(sizeof(ds_ring_stats) == 64, "ring stats layout");

typedef struct ds_ring_top {
	int32_t token;
	float logprob;
} ds_ring_top;

/* An event as both sides see it; pointers refer to the caller's memory
 * (writer) or to the mapping (reader: valid until the next ds_ring_next). */
typedef struct ds_ring_event {
	int type;
	int finish;
	uint64_t request_id;
	uint32_t seq;
	int32_t token;
	float logprob;
	const char *text;
	uint32_t text_len;
	const ds_ring_top *top;
	int n_top;
	const ds_ring_stats *stats; /* final only */
} ds_ring_event;

typedef struct ds_ring_writer ds_ring_writer;
typedef struct ds_ring_reader ds_ring_reader;

/* Creates a ring of data_size bytes (a power of two, >= 4 KiB): a memfd
 * sealed against shrinking and growing, and an eventfd. *memfd and *efd
 * stay owned by the writer (pass copies with SCM_RIGHTS). */
int ds_ring_create(size_t data_size, ds_ring_writer **out);
ds_ring_writer *ds_ring_writer_free(ds_ring_writer *w);
int ds_ring_writer_fds(const ds_ring_writer *w, int *memfd, int *efd);
/* Bytes a record for ev needs. */
size_t ds_ring_event_size(const ds_ring_event *ev);
/* Appends ev (not yet visible). -EAGAIN when there is no room (sets
 * writer_waiting), -EPROTO when the reader corrupted read_pos, -E2BIG when
 * ev can never fit. */
int ds_ring_put(ds_ring_writer *w, const ds_ring_event *ev);
/* Room free now (-EPROTO when read_pos is corrupt). */
long ds_ring_room(ds_ring_writer *w);
/* Makes the appended records visible and wakes the reader if it sleeps.
 * Returns 1 when a wake-up was sent, 0 otherwise. */
int ds_ring_publish(ds_ring_writer *w);

/* Maps a ring received from the daemon; checks its header and size. */
int ds_ring_attach(int memfd, int efd, ds_ring_reader **out);
ds_ring_reader *ds_ring_reader_free(ds_ring_reader *r);
/* 1 and *ev filled, 0 when empty, -EPROTO when a record is malformed.
 * Consumes the previous event first. */
int ds_ring_next(ds_ring_reader *r, ds_ring_event *ev);
/* Sleeps until the writer publishes or timeout_ms passes (-1: forever).
 * 0 when there may be data, -ETIMEDOUT, -EINTR. */
int ds_ring_wait(ds_ring_reader *r, int timeout_ms);
/* For poll-based readers: marks the reader asleep on the eventfd. Returns 1
 * when data is already there (do not sleep), 0 when the eventfd will fire. */
int ds_ring_arm(ds_ring_reader *r);
/* Clears the eventfd and the sleep mark after poll says it fired. */
void ds_ring_disarm(ds_ring_reader *r);
int ds_ring_reader_efd(const ds_ring_reader *r);
/* 1 (and clears the flag) when the writer paused a stream for lack of
 * room; the client then tells the daemon it read ("resume"). */
int ds_ring_take_writer_waiting(ds_ring_reader *r);

#endif
