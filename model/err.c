#include "model/err.h"

#include <stdarg.h>
#include <stdio.h>

int ds_errf(ds_err *e, int rc, const char *fmt, ...)
{
	if (e) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
		va_end(ap);
	}
	return rc;
}
