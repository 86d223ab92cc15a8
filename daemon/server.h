/* server.h — what the event loop (serve.c) and the engine thread
 * (batcher.c) share: a connection and a request. The loop creates both;
 * fields marked "engine" belong to the engine thread once submitted, the
 * rest are read-only after submission. A connection is freed when its last
 * reference (loop, requests, queued output) is dropped, from either thread. */
#ifndef DS_SERVER_H
#define DS_SERVER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cache/sched.h"
#include "ipc/prescan.h"
#include "ipc/ring.h"
#include "model/engine.h"
#include "model/sampler.h"
#include "model/spec.h"
#include "model/tokenizer.h"

typedef struct ds_conn {
	atomic_int refs;
	uint64_t id;
	uid_t uid;
	gid_t gid;
	pid_t pid;
	ds_ring_writer *ring;    /* set at hello, before any request */
	atomic_int gone;         /* disconnected, or its ring was corrupted */
	atomic_long out_bytes;   /* event bytes queued for the socket, not yet sent */
	atomic_int want_resume;  /* the engine paused a stream on out_bytes */
	/* loop thread only */
	int fd;
	char name[64];
	uint8_t *in;
	size_t in_len, in_cap;
	ds_prescan ps;
	uint8_t *out;
	size_t out_len, out_off, out_cap;
	long fd_at;              /* offset in out where the ring fds go, or -1 */
	int n_requests;
	int closing;             /* close once out is flushed */
	struct ds_conn *next;
} ds_conn;

ds_conn *ds_conn_ref(ds_conn *c);
/* Drops a reference; frees at zero. Returns NULL. */
ds_conn *ds_conn_unref(ds_conn *c);

typedef struct ds_pend ds_pend;

typedef struct ds_req {
	uint64_t id;
	ds_conn *conn;           /* referenced */
	uid_t uid;
	pid_t pid;
	int use_ring;
	int32_t *tokens;         /* prompt, then generated: room for n_prompt + max_tokens + 1 */
	int n_prompt;
	ds_sampling sp;
	int max_tokens;
	int logprobs;            /* alternatives per token, 0 = none, -1 = chosen token only */
	int ignore_eos;
	int skip_special;
	int mtp;                 /* the engine may draft with the MTP module (protocol "mtp", default true) */
	int32_t *stop_ids;
	int n_stop_ids;
	char **stop;             /* NUL-terminated, valid UTF-8 */
	int n_stop;
	size_t stop_max;         /* longest stop string */
	double t_arrive;         /* CLOCK_MONOTONIC seconds */
	/* engine */
	ds_sched_req sr;
	ds_seq *seq;
	ds_sampler *smp;
	ds_draw draw;            /* a device draw's settings and u (ds_engine_draws) */
	int draw_for;            /* the token index draw.u was taken for, -1 none */
	ds_spec_req spec;        /* MTP state; depth 0 when the daemon runs without MTP */
	int32_t vin[DS_SPEC_MAX_DEPTH + 1]; /* a verifying step's input: the pending token, then the drafts */
	uint32_t drafted, accepted; /* drafts verified, and accepted */
	int offered;             /* full blocks offered to the prefix cache */
	ds_tok_stream *ts;
	char *hold;              /* text held back while it may start a stop string */
	size_t hold_len, hold_cap;
	int n_gen;
	int hit_tokens;          /* prompt tokens served from the prefix cache */
	uint32_t seq_no;
	double t_first, t_prefill_done;
	int finished;
	int in_sched;
	ds_pend *pend_head, *pend_tail;
	struct ds_req *next;     /* the engine's list of live requests */
} ds_req;

/* Frees a request and everything it owns (the engine's parts included). */
void ds_req_free(ds_req *r);

double ds_now(void);

#endif
