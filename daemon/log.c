#include "daemon/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static int log_level = DS_LOG_INFO;

void ds_log_set_level(int level)
{
	__atomic_store_n(&log_level, level, __ATOMIC_RELAXED);
}

void ds_log(int level, const char *fmt, ...)
{
	if (level > __atomic_load_n(&log_level, __ATOMIC_RELAXED))
		return;
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "<%d>", level);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n += m < 0 ? 0 : m >= (int)sizeof(buf) - n - 1 ? (int)sizeof(buf) - n - 2 : m;
	buf[n++] = '\n';
	ssize_t w = write(2, buf, (size_t)n); /* one write: lines from threads do not interleave */
	(void)w;
}
