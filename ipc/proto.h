/* proto.h — dsd's msgpack-rpc messages (docs/PROTOCOL.md): decoding a framed
 * message into a checked shape, field getters that check types, packing
 * helpers, error codes, UTF-8 validation. Decoded objects live in the
 * ds_ipc_msg's zone until ds_ipc_msg_clear. Any thread; no shared state. */
#ifndef DS_IPC_PROTO_H
#define DS_IPC_PROTO_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#define DS_PROTOCOL_VERSION 1
#define DS_IPC_MAX_DEPTH 8

enum { DS_MSG_REQUEST = 0, DS_MSG_RESPONSE = 1, DS_MSG_NOTIFY = 2 };

/* Error codes of [code, message] errors; stable, documented in PROTOCOL.md. */
enum {
	DS_E_PARSE = 1,          /* framing broken: the connection closes after this */
	DS_E_INVALID_REQUEST = 2,/* not [0, msgid, method, params] */
	DS_E_UNKNOWN_METHOD = 3,
	DS_E_INVALID_PARAMS = 4, /* wrong type, out of range, invalid UTF-8 */
	DS_E_LIMIT = 5,          /* over a configured limit (retry later or ask less) */
	DS_E_NOT_FOUND = 6,      /* no such request */
	DS_E_PERMISSION = 7,
	DS_E_UNAVAILABLE = 8,    /* shutting down, or the model lacks what is asked (tokenizer) */
	DS_E_INTERNAL = 9,
	DS_E_TOO_LARGE = 10,     /* message over max_message_bytes: the connection closes */
};

typedef struct ds_ipc_msg {
	int type;                 /* DS_MSG_* */
	uint32_t msgid;           /* requests and responses */
	const char *method;       /* requests and notifications; not NUL-terminated */
	size_t method_len;
	const msgpack_object *params;  /* requests/notifications: array or map */
	const msgpack_object *error;   /* responses: nil or [code, message] */
	const msgpack_object *result;  /* responses */
	msgpack_unpacked u;
} ds_ipc_msg;

/* buf[0..len) is one whole message (ds_prescan said so). Returns 0, or
 * -EBADMSG with *why set when the shape is wrong; *msgid_out gets the msgid
 * when one could be read (else UINT32_MAX), so the error can answer it.
 * Call ds_ipc_msg_clear in both cases. */
int ds_ipc_decode(const uint8_t *buf, size_t len, ds_ipc_msg *m, uint32_t *msgid_out, const char **why);
void ds_ipc_msg_clear(ds_ipc_msg *m);
int ds_ipc_method_is(const ds_ipc_msg *m, const char *name);

/* Map lookups: NULL when absent or when o is not a map. */
const msgpack_object *ds_mp_get(const msgpack_object *map, const char *key);
/* Typed reads: 0, -ENOENT when absent or nil, -EINVAL on a wrong type/range. */
int ds_mp_int(const msgpack_object *map, const char *key, int64_t lo, int64_t hi, int64_t *out);
int ds_mp_uint64(const msgpack_object *map, const char *key, uint64_t *out);
int ds_mp_double(const msgpack_object *map, const char *key, double lo, double hi, double *out);
int ds_mp_bool(const msgpack_object *map, const char *key, int *out);
/* Strings must be valid UTF-8 (-EILSEQ otherwise). */
int ds_mp_str(const msgpack_object *map, const char *key, const char **s, size_t *len);

int ds_utf8_valid(const char *s, size_t n);
/* Bytes of s[0..n) that form complete UTF-8 characters (for cutting a string). */
size_t ds_utf8_complete(const char *s, size_t n);

/* Packing. */
void ds_mp_pack_str(msgpack_packer *pk, const char *s);
void ds_mp_pack_strn(msgpack_packer *pk, const char *s, size_t n);
/* [1, msgid, nil, <caller packs result>] */
void ds_ipc_pack_response_head(msgpack_packer *pk, uint32_t msgid);
/* [1, msgid, [code, message], nil] */
void ds_ipc_pack_error(msgpack_packer *pk, uint32_t msgid, int code, const char *message);
/* [0, msgid, method, <caller packs params>] */
void ds_ipc_pack_request_head(msgpack_packer *pk, uint32_t msgid, const char *method);
/* [2, method, <caller packs params>] */
void ds_ipc_pack_notify_head(msgpack_packer *pk, const char *method);

/* sendmsg/recvmsg with SCM_RIGHTS: send passes nfds (<= 4) descriptors with
 * the first byte of buf; recv appends any it gets to fds (room for *nfds_io,
 * updated; extra ones are closed). Both return bytes or -errno. */
#define DS_IPC_MAX_FDS 4
ssize_t ds_ipc_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
ssize_t ds_ipc_recv_fds(int sock, void *buf, size_t cap, int *fds, int *nfds_io);

#endif
