/* dsclient.h — libdsclient: a C client for the dsd daemon (docs/PROTOCOL.md).
 *
 * Every function returns 0 (or a count) on success and a negative errno on
 * failure; constructors fill their `ret` argument only on success;
 * destructors accept NULL and return NULL. The library keeps no global
 * state, never prints and never exits.
 *
 * Thread safety: a ds_client is used by one thread at a time (calls on the
 * same handle must be serialized by the caller); different handles are
 * independent and may be used from different threads concurrently. Pointers
 * inside a ds_event stay valid until the next call on the same handle.
 *
 * Events of all of a handle's requests arrive in one stream; each names its
 * request. By default the daemon writes them into a shared-memory ring (no
 * system call per token); opts.no_ring asks for msgpack notifications on
 * the socket instead. */
#ifndef DSCLIENT_H
#define DSCLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DSCLIENT_PROTOCOL 1

typedef struct ds_client ds_client;

typedef struct ds_client_opts {
	const char *name;   /* shown by `dsctl ps`; NULL: "libdsclient" */
	int no_ring;        /* 1: events as socket notifications, not through the ring */
	int timeout_ms;     /* for connect and each call; 0: 30000, -1: none */
} ds_client_opts;

/* path NULL: $DSD_SOCKET, else $XDG_RUNTIME_DIR/dsd.sock when that file
 * exists (non-root: the user's own daemon), else /run/dsd/dsd.sock (the
 * system service). opts may be NULL. -ENOENT / -ECONNREFUSED /
 * -EACCES when no daemon answers there. */
int ds_client_connect(const char *path, const ds_client_opts *opts, ds_client **ret);
ds_client *ds_client_free(ds_client *c);

/* The daemon's last error for this handle: its [code, message]. */
const char *ds_client_last_error(const ds_client *c);
int ds_client_last_code(const ds_client *c);

typedef struct ds_gen_params {
	const char *prompt;         /* text, or NULL and ids */
	const int32_t *ids;
	size_t n_ids;
	int32_t max_tokens;         /* 0: the server's default */
	float temperature;          /* 0: greedy; NaN (the init value): the server's default, 1.0 */
	int32_t top_k;              /* -1: default */
	float top_p, min_p;         /* NaN: default */
	float repetition_penalty, presence_penalty, frequency_penalty; /* NaN: default */
	uint64_t seed;
	int has_seed;
	const char *const *stop;    /* stop strings */
	size_t n_stop;
	const int32_t *stop_ids;
	size_t n_stop_ids;
	int32_t logprobs;           /* -1: none; 0: the chosen token's; N: plus N alternatives */
	int parse_special;          /* parse special-token text in the prompt */
	int ignore_eos;
	int no_mtp;                 /* no speculative decoding for this request (same output, see PROTOCOL.md) */
} ds_gen_params;

void ds_gen_params_init(ds_gen_params *p);

/* Starts a request; *id names its events. */
int ds_client_generate(ds_client *c, const ds_gen_params *p, uint64_t *id);

typedef struct ds_client_msg {
	const char *role;    /* "system", "user", "assistant" */
	const char *content;
} ds_client_msg;

/* Renders msgs with the model's chat template and generates (p->prompt
 * and p->ids are ignored). */
int ds_client_chat(ds_client *c, const ds_client_msg *msgs, size_t n, const ds_gen_params *p, uint64_t *id);

enum { DS_CLIENT_FINISH_NONE = 0, DS_CLIENT_FINISH_STOP = 1, DS_CLIENT_FINISH_LENGTH = 2,
       DS_CLIENT_FINISH_CANCELLED = 3, DS_CLIENT_FINISH_ERROR = 4 };

typedef struct ds_client_top {
	int32_t token;
	float logprob;
} ds_client_top;

typedef struct ds_gen_stats {
	uint32_t prompt_tokens, generated_tokens, cached_tokens;
	uint64_t ttft_ns, total_ns, prefill_ns, decode_ns;
	uint32_t drafted, accepted; /* MTP drafts verified / accepted */
} ds_gen_stats;

typedef struct ds_event {
	uint64_t request_id;
	uint32_t seq;          /* 0, 1, ... within the request */
	int32_t token;         /* -1 on the final event */
	float logprob;         /* NaN unless asked for */
	const char *text;      /* UTF-8 piece (not NUL-terminated) */
	size_t text_len;
	int n_top;
	const ds_client_top *top;
	int final;             /* the request's last event */
	int finish;            /* DS_CLIENT_FINISH_* (final) */
	const char *error;     /* NUL-terminated message when finish is ERROR */
	ds_gen_stats stats;    /* final */
} ds_event;

/* Waits up to timeout_ms (-1: forever, 0: not at all) for the next event.
 * -EAGAIN (timeout 0) / -ETIMEDOUT when none came; -ECONNRESET when the
 * daemon went away. After -EAGAIN, ds_client_fd() becomes readable when
 * there is more. */
int ds_client_next_event(ds_client *c, int timeout_ms, ds_event *ev);
/* A descriptor for poll/epoll (readable: call ds_client_next_event). */
int ds_client_fd(const ds_client *c);

/* Cancels a request (its final event follows with finish CANCELLED).
 * -ENOENT when it is not running; -EACCES when it is another user's. */
int ds_client_cancel(ds_client *c, uint64_t id);

/* Calls a method without parameters ("status", "stats", "ps") and returns
 * its result as JSON text (malloc'd; free it). */
int ds_client_call_json(ds_client *c, const char *method, char **json);

/* Token ids of text (malloc'd; free it). */
int ds_client_tokenize(ds_client *c, const char *text, int parse_special, int32_t **ids, size_t *n);

#ifdef __cplusplus
}
#endif

#endif
