/* prescan.h — checks a msgpack message before msgpack-c sees it.
 * msgpack-c allocates from a container's declared count before the elements
 * arrive, so every count is checked against the bytes the size limit leaves,
 * and nesting is bounded. Resumable: bytes may arrive in pieces. Pure
 * function of its input; the caller owns the state (any thread). */
#ifndef DS_IPC_PRESCAN_H
#define DS_IPC_PRESCAN_H

#include <stddef.h>
#include <stdint.h>

#define DS_PRESCAN_MAX_DEPTH 16

typedef struct ds_prescan {
	size_t pos;         /* bytes of the message accepted so far */
	size_t limit;       /* largest message allowed */
	int max_depth;      /* <= DS_PRESCAN_MAX_DEPTH */
	int depth;
	uint64_t rem[DS_PRESCAN_MAX_DEPTH + 1]; /* objects still due at each level */
} ds_prescan;

void ds_prescan_init(ds_prescan *s, size_t limit, int max_depth);
/* buf[0..len) holds the message's bytes so far (it may hold more after it).
 * Returns 1 when one complete message of s->pos bytes is there, 0 when more
 * bytes are needed, -EMSGSIZE when it would exceed the limit, -EBADMSG when
 * a declared count cannot fit in the bytes the limit leaves, nesting is too
 * deep, or a reserved type byte (0xc1) appears. */
int ds_prescan_feed(ds_prescan *s, const uint8_t *buf, size_t len);

#endif
