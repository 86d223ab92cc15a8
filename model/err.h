/* err.h — a caller-owned error message buffer.
 * Library code never logs: functions return 0 / -errno and, when given a
 * ds_err, write one human-readable line naming the file and the object at
 * fault. Any thread; the buffer belongs to the caller. */
#ifndef DS_ERR_H
#define DS_ERR_H

#include <stddef.h>

typedef struct ds_err {
	char msg[512];
} ds_err;

/* Formats into e (if non-NULL) and returns rc (a negative errno), so a
 * failure site reads: return ds_errf(e, -EINVAL, "%s: ...", path); */
int ds_errf(ds_err *e, int rc, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
