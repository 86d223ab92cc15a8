/* conn.c — connection reference counting and the daemon's clock (server.h). */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "daemon/server.h"

ds_conn *ds_conn_ref(ds_conn *c)
{
	if (c)
		atomic_fetch_add(&c->refs, 1);
	return c;
}

ds_conn *ds_conn_unref(ds_conn *c)
{
	if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
		return NULL;
	ds_ring_writer_free(c->ring);
	if (c->fd >= 0)
		close(c->fd);
	free(c->in);
	free(c->out);
	free(c);
	return NULL;
}

double ds_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
