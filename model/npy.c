#include "model/npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ds_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, ds_err *e)
{
	char hdr[128];
	int n = snprintf(hdr, sizeof(hdr), "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu, %zu), }", rows,
			 cols);
	/* Magic (6) + version (2) + length (2) + header, padded with spaces to a
	 * multiple of 64 and ended by a newline. */
	int total = 10 + n + 1;
	int pad = (64 - total % 64) % 64;
	FILE *f = fopen(path, "wb");
	if (!f)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	unsigned short hl = (unsigned short)(n + pad + 1);
	unsigned char pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hl & 0xff),
				  (unsigned char)(hl >> 8) };
	int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(hdr, 1, (size_t)n, f) == (size_t)n;
	for (int i = 0; i < pad && ok; i++)
		ok = fputc(' ', f) != EOF;
	ok = ok && fputc('\n', f) != EOF;
	ok = ok && fwrite(data, sizeof(float), rows * cols, f) == rows * cols;
	if (fclose(f) != 0 || !ok)
		return ds_errf(e, -EIO, "%s: write failed", path);
	return 0;
}

int ds_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, ds_err *e)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return ds_errf(e, -errno, "%s: %s", path, strerror(errno));
	unsigned char pre[10];
	char hdr[1024];
	int rc = -EINVAL;
	if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) || pre[6] != 1) {
		rc = ds_errf(e, -EINVAL, "%s: not a version 1 .npy file", path);
		goto out;
	}
	size_t hl = pre[8] | (size_t)pre[9] << 8;
	if (hl >= sizeof(hdr) || fread(hdr, 1, hl, f) != hl) {
		rc = ds_errf(e, -EINVAL, "%s: bad .npy header", path);
		goto out;
	}
	hdr[hl] = 0;
	if (!strstr(hdr, "'<f4'") || !strstr(hdr, "'fortran_order': False")) {
		rc = ds_errf(e, -EINVAL, "%s: only little-endian float32 in C order is supported", path);
		goto out;
	}
	const char *sh = strstr(hdr, "'shape': (");
	size_t r = 0, c = 0;
	if (!sh || sscanf(sh + 10, "%zu, %zu", &r, &c) < 1) {
		rc = ds_errf(e, -EINVAL, "%s: no shape in the header", path);
		goto out;
	}
	if (c == 0) { /* 1-D: "(n,)" */
		c = r;
		r = 1;
	}
	float *d = malloc(sizeof(float) * r * c + 1);
	if (!d) {
		rc = -ENOMEM;
		goto out;
	}
	if (fread(d, sizeof(float), r * c, f) != r * c) {
		free(d);
		rc = ds_errf(e, -EINVAL, "%s: truncated data", path);
		goto out;
	}
	*data = d;
	*rows = r;
	*cols = c;
	rc = 0;
out:
	fclose(f);
	return rc;
}
