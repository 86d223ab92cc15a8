#include "ipc/prescan.h"

#include <errno.h>

void ds_prescan_init(ds_prescan *s, size_t limit, int max_depth)
{
	s->pos = 0;
	s->limit = limit;
	s->max_depth = max_depth > DS_PRESCAN_MAX_DEPTH ? DS_PRESCAN_MAX_DEPTH : max_depth < 1 ? 1 : max_depth;
	s->depth = 0;
	s->rem[0] = 1;
}

static uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = v << 8 | p[i];
	return v;
}

/* What the object at p is: hdr bytes of header (type byte included), then
 * either `payload` raw bytes or `count` child objects. */
typedef struct {
	int hdr;           /* bytes of the header, 0 for the reserved byte */
	int lenbytes;      /* bytes of the big-endian length that follow the type byte */
	int fixed;         /* payload bytes fixed by the type (numbers, fixext) */
	int kind;          /* 0 scalar/raw, 1 array, 2 map */
	int ext;           /* ext with a length: one type byte after the length */
} shape;

static shape classify(uint8_t t)
{
	shape s = { 1, 0, 0, 0, 0 };
	if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3)
		return s;
	if ((t & 0xf0) == 0x80) { s.kind = 2; return s; }
	if ((t & 0xf0) == 0x90) { s.kind = 1; return s; }
	if ((t & 0xe0) == 0xa0) { s.fixed = t & 0x1f; return s; }
	switch (t) {
	case 0xc4: case 0xd9: s.lenbytes = 1; break;           /* bin8, str8 */
	case 0xc5: case 0xda: s.lenbytes = 2; break;           /* bin16, str16 */
	case 0xc6: case 0xdb: s.lenbytes = 4; break;           /* bin32, str32 */
	case 0xc7: s.lenbytes = 1; s.ext = 1; break;           /* ext8 */
	case 0xc8: s.lenbytes = 2; s.ext = 1; break;
	case 0xc9: s.lenbytes = 4; s.ext = 1; break;
	case 0xca: s.fixed = 4; break;                         /* float32 */
	case 0xcb: s.fixed = 8; break;                         /* float64 */
	case 0xcc: case 0xd0: s.fixed = 1; break;
	case 0xcd: case 0xd1: s.fixed = 2; break;
	case 0xce: case 0xd2: s.fixed = 4; break;
	case 0xcf: case 0xd3: s.fixed = 8; break;
	case 0xd4: s.fixed = 2; break;                         /* fixext 1..16: type + data */
	case 0xd5: s.fixed = 3; break;
	case 0xd6: s.fixed = 5; break;
	case 0xd7: s.fixed = 9; break;
	case 0xd8: s.fixed = 17; break;
	case 0xdc: s.lenbytes = 2; s.kind = 1; break;          /* array16 */
	case 0xdd: s.lenbytes = 4; s.kind = 1; break;          /* array32 */
	case 0xde: s.lenbytes = 2; s.kind = 2; break;          /* map16 */
	case 0xdf: s.lenbytes = 4; s.kind = 2; break;          /* map32 */
	default: s.hdr = 0; break;                             /* 0xc1: never used */
	}
	return s;
}

int ds_prescan_feed(ds_prescan *s, const uint8_t *buf, size_t len)
{
	for (;;) {
		while (s->depth > 0 && s->rem[s->depth] == 0)
			s->depth--;
		if (s->depth == 0 && s->rem[0] == 0)
			return 1;
		if (s->pos >= s->limit)
			return -EMSGSIZE;
		if (s->pos >= len)
			return 0;
		const uint8_t t = buf[s->pos];
		shape sh = classify(t);
		if (!sh.hdr)
			return -EBADMSG;
		size_t hdr = 1 + (size_t)sh.lenbytes + (size_t)sh.ext;
		if (s->pos + hdr > s->limit)
			return -EMSGSIZE;
		if (s->pos + hdr > len)
			return 0;
		uint64_t n = sh.lenbytes ? be(buf + s->pos + 1, sh.lenbytes) : 0;
		if (sh.kind == 0 && !sh.lenbytes)
			n = (uint64_t)sh.fixed;
		else if (sh.kind && !sh.lenbytes)
			n = t & 0x0f;
		const uint64_t left = s->limit - s->pos - hdr; /* bytes the limit still allows */
		if (sh.kind == 0) {
			if (n > left)
				return -EMSGSIZE;
			if (s->pos + hdr + n > len)
				return 0;
			s->pos += hdr + (size_t)n;
			s->rem[s->depth]--;
			continue;
		}
		/* a container: each element takes at least one byte, a map entry two */
		uint64_t elems = sh.kind == 2 ? 2 * n : n;
		if (elems > left)
			return -EBADMSG;
		s->pos += hdr;
		s->rem[s->depth]--;
		if (elems) {
			if (s->depth >= s->max_depth)
				return -EBADMSG;
			s->rem[++s->depth] = elems;
		}
	}
}
