/* Fuzzes the daemon's protocol decoder: bytes go through the pre-scanner
 * (fed in two pieces, as a socket delivers them) and, when it accepts a
 * message, through msgpack-c and the shape checks, then every getter the
 * methods use. Must never crash, leak or allocate without bound. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ipc/prescan.h"
#include "ipc/proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	ds_prescan s;
	ds_prescan_init(&s, 1 << 16, DS_IPC_MAX_DEPTH);
	size_t cut = size ? data[0] % (size + 1) : 0;
	int rc = ds_prescan_feed(&s, data, cut);
	if (rc == 0)
		rc = ds_prescan_feed(&s, data, size);
	if (rc != 1)
		return 0;
	ds_ipc_msg m;
	uint32_t id;
	const char *why;
	if (ds_ipc_decode(data, s.pos, &m, &id, &why) == 0 && m.params) {
		int64_t v;
		uint64_t u;
		double d;
		int b;
		const char *str;
		size_t n;
		static const char *const keys[] = { "ids", "prompt", "max_tokens", "temperature", "seed", "stop", "id" };
		for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
			ds_mp_int(m.params, keys[i], INT64_MIN, INT64_MAX, &v);
			ds_mp_uint64(m.params, keys[i], &u);
			ds_mp_double(m.params, keys[i], -1e300, 1e300, &d);
			ds_mp_bool(m.params, keys[i], &b);
			ds_mp_str(m.params, keys[i], &str, &n);
		}
	}
	ds_ipc_msg_clear(&m);
	return 0;
}
