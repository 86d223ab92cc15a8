/* libFuzzer: the safetensors header parser and the config.json parser on
 * arbitrary bytes. The first byte picks the target. */
#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	if (data[0] & 1) {
		ds_st_header h;
		if (ds_st_parse(data + 1, size - 1, size - 1, "fuzz", &h, NULL) == 0)
			ds_st_header_free(&h);
	} else {
		ds_config c;
		ds_config_parse((const char *)data + 1, size - 1, "fuzz", &c, NULL);
	}
	return 0;
}
