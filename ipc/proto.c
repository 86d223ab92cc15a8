#include "ipc/proto.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int ds_ipc_decode(const uint8_t *buf, size_t len, ds_ipc_msg *m, uint32_t *msgid_out, const char **why)
{
	memset(m, 0, sizeof(*m));
	msgpack_unpacked_init(&m->u);
	*msgid_out = UINT32_MAX;
	size_t off = 0;
	if (msgpack_unpack_next(&m->u, (const char *)buf, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len) {
		*why = "malformed msgpack";
		return -EBADMSG;
	}
	const msgpack_object *o = &m->u.data;
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 3 || o->via.array.size > 4) {
		*why = "a message is an array [type, msgid, method, params] or [2, method, params]";
		return -EBADMSG;
	}
	const msgpack_object *a = o->via.array.ptr;
	if (a[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[0].via.u64 > 2) {
		*why = "message type must be 0, 1 or 2";
		return -EBADMSG;
	}
	m->type = (int)a[0].via.u64;
	if (m->type == DS_MSG_NOTIFY) {
		if (o->via.array.size != 3 || a[1].type != MSGPACK_OBJECT_STR) {
			*why = "a notification is [2, method, params]";
			return -EBADMSG;
		}
		m->method = a[1].via.str.ptr;
		m->method_len = a[1].via.str.size;
		m->params = &a[2];
	} else {
		if (o->via.array.size != 4 || a[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[1].via.u64 > UINT32_MAX) {
			*why = "requests are [0, msgid, method, params] with msgid in [0, 2^32)";
			return -EBADMSG;
		}
		m->msgid = (uint32_t)a[1].via.u64;
		*msgid_out = m->msgid;
		if (m->type == DS_MSG_REQUEST) {
			if (a[2].type != MSGPACK_OBJECT_STR) {
				*why = "method must be a string";
				return -EBADMSG;
			}
			m->method = a[2].via.str.ptr;
			m->method_len = a[2].via.str.size;
			m->params = &a[3];
		} else {
			m->error = &a[2];
			m->result = &a[3];
		}
	}
	if (m->method && !ds_utf8_valid(m->method, m->method_len)) {
		*why = "method is not valid UTF-8";
		return -EBADMSG;
	}
	if (m->params && m->params->type != MSGPACK_OBJECT_ARRAY && m->params->type != MSGPACK_OBJECT_MAP &&
	    m->params->type != MSGPACK_OBJECT_NIL) {
		*why = "params must be a map, an array or nil";
		return -EBADMSG;
	}
	return 0;
}

void ds_ipc_msg_clear(ds_ipc_msg *m)
{
	msgpack_unpacked_destroy(&m->u);
	memset(m, 0, sizeof(*m));
}

int ds_ipc_method_is(const ds_ipc_msg *m, const char *name)
{
	size_t n = strlen(name);
	return m->method && m->method_len == n && !memcmp(m->method, name, n);
}

const msgpack_object *ds_mp_get(const msgpack_object *map, const char *key)
{
	if (!map || map->type != MSGPACK_OBJECT_MAP)
		return NULL;
	size_t n = strlen(key);
	for (uint32_t i = 0; i < map->via.map.size; i++) {
		const msgpack_object *k = &map->via.map.ptr[i].key;
		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && !memcmp(k->via.str.ptr, key, n))
			return &map->via.map.ptr[i].val;
	}
	return NULL;
}

static const msgpack_object *present(const msgpack_object *map, const char *key)
{
	const msgpack_object *v = ds_mp_get(map, key);
	return v && v->type != MSGPACK_OBJECT_NIL ? v : NULL;
}

int ds_mp_int(const msgpack_object *map, const char *key, int64_t lo, int64_t hi, int64_t *out)
{
	const msgpack_object *v = present(map, key);
	if (!v)
		return -ENOENT;
	int64_t x;
	if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		if (v->via.u64 > INT64_MAX)
			return -EINVAL;
		x = (int64_t)v->via.u64;
	} else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
		x = v->via.i64;
	} else {
		return -EINVAL;
	}
	if (x < lo || x > hi)
		return -EINVAL;
	*out = x;
	return 0;
}

int ds_mp_uint64(const msgpack_object *map, const char *key, uint64_t *out)
{
	const msgpack_object *v = present(map, key);
	if (!v)
		return -ENOENT;
	if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		return -EINVAL;
	*out = v->via.u64;
	return 0;
}

int ds_mp_double(const msgpack_object *map, const char *key, double lo, double hi, double *out)
{
	const msgpack_object *v = present(map, key);
	if (!v)
		return -ENOENT;
	double x;
	switch (v->type) {
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: x = v->via.f64; break;
	case MSGPACK_OBJECT_POSITIVE_INTEGER: x = (double)v->via.u64; break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: x = (double)v->via.i64; break;
	default: return -EINVAL;
	}
	if (!isfinite(x) || x < lo || x > hi)
		return -EINVAL;
	*out = x;
	return 0;
}

int ds_mp_bool(const msgpack_object *map, const char *key, int *out)
{
	const msgpack_object *v = present(map, key);
	if (!v)
		return -ENOENT;
	if (v->type != MSGPACK_OBJECT_BOOLEAN)
		return -EINVAL;
	*out = v->via.boolean;
	return 0;
}

int ds_mp_str(const msgpack_object *map, const char *key, const char **s, size_t *len)
{
	const msgpack_object *v = present(map, key);
	if (!v)
		return -ENOENT;
	if (v->type != MSGPACK_OBJECT_STR)
		return -EINVAL;
	if (!ds_utf8_valid(v->via.str.ptr, v->via.str.size))
		return -EILSEQ;
	*s = v->via.str.ptr;
	*len = v->via.str.size;
	return 0;
}

/* Length of the UTF-8 character at s (<= n bytes left), 0 if invalid:
 * no overlong forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_char(const unsigned char *s, size_t n, int *incomplete)
{
	*incomplete = 0;
	unsigned c = s[0];
	if (c < 0x80)
		return 1;
	size_t k;
	unsigned lo = 0x80, hi = 0xbf;
	if (c >= 0xc2 && c <= 0xdf) k = 2;
	else if (c == 0xe0) { k = 3; lo = 0xa0; }
	else if (c == 0xed) { k = 3; hi = 0x9f; }
	else if (c >= 0xe1 && c <= 0xef) k = 3;
	else if (c == 0xf0) { k = 4; lo = 0x90; }
	else if (c == 0xf4) { k = 4; hi = 0x8f; }
	else if (c >= 0xf1 && c <= 0xf3) k = 4;
	else return 0;
	for (size_t i = 1; i < k; i++) {
		if (i >= n) {
			*incomplete = 1;
			return 0;
		}
		unsigned b = s[i];
		if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xbf))
			return 0;
	}
	return k;
}

int ds_utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	for (size_t i = 0; i < n;) {
		int inc;
		size_t k = utf8_char(p + i, n - i, &inc);
		if (!k)
			return 0;
		i += k;
	}
	return 1;
}

size_t ds_utf8_complete(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	while (i < n) {
		int inc;
		size_t k = utf8_char(p + i, n - i, &inc);
		if (!k)
			break;
		i += k;
	}
	return i;
}

void ds_mp_pack_strn(msgpack_packer *pk, const char *s, size_t n)
{
	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

void ds_mp_pack_str(msgpack_packer *pk, const char *s)
{
	ds_mp_pack_strn(pk, s, strlen(s));
}

void ds_ipc_pack_response_head(msgpack_packer *pk, uint32_t msgid)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, DS_MSG_RESPONSE);
	msgpack_pack_uint32(pk, msgid);
	msgpack_pack_nil(pk);
}

void ds_ipc_pack_error(msgpack_packer *pk, uint32_t msgid, int code, const char *message)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, DS_MSG_RESPONSE);
	msgpack_pack_uint32(pk, msgid);
	msgpack_pack_array(pk, 2);
	msgpack_pack_int(pk, code);
	ds_mp_pack_str(pk, message);
	msgpack_pack_nil(pk);
}

void ds_ipc_pack_request_head(msgpack_packer *pk, uint32_t msgid, const char *method)
{
	msgpack_pack_array(pk, 4);
	msgpack_pack_uint8(pk, DS_MSG_REQUEST);
	msgpack_pack_uint32(pk, msgid);
	ds_mp_pack_str(pk, method);
}

void ds_ipc_pack_notify_head(msgpack_packer *pk, const char *method)
{
	msgpack_pack_array(pk, 3);
	msgpack_pack_uint8(pk, DS_MSG_NOTIFY);
	ds_mp_pack_str(pk, method);
}

ssize_t ds_ipc_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
	if (nfds < 0 || nfds > DS_IPC_MAX_FDS || len == 0)
		return -EINVAL;
	union {
		char b[CMSG_SPACE(sizeof(int) * DS_IPC_MAX_FDS)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	ssize_t r = sendmsg(sock, &mh, MSG_NOSIGNAL);
	return r < 0 ? -errno : r;
}

ssize_t ds_ipc_recv_fds(int sock, void *buf, size_t cap, int *fds, int *nfds_io)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * DS_IPC_MAX_FDS)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = buf, .iov_len = cap };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
	ssize_t r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	if (r < 0)
		return -errno;
	int room = nfds_io ? DS_IPC_MAX_FDS - *nfds_io : 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		for (int i = 0; i < n; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + sizeof(int) * (size_t)i, sizeof(int));
			if (fds && room > 0) {
				fds[(*nfds_io)++] = fd;
				room--;
			} else {
				close(fd);
			}
		}
	}
	return r;
}
