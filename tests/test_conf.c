/* conf/: defaults lie within their own bounds, a file is read over them with
 * errors naming file:line and the allowed range, flags win, cross-key
 * checks, and the reload diff names what needs a restart. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf/conf.h"

static char path[64];

static void write_file(const char *text)
{
	snprintf(path, sizeof(path), "/tmp/test_conf.%d.conf", (int)getpid());
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static void test_defaults(void **st)
{
	(void)st;
	size_t n;
	const ds_conf_key *k = ds_conf_keys(&n);
	assert_true(n > 20);
	ds_conf c;
	ds_conf_defaults(&c);
	for (size_t i = 0; i < n; i++) {
		ds_err e = { { 0 } };
		ds_conf d = c;
		/* the default, as text, is accepted by its own bounds */
		assert_int_equal(ds_conf_set(&d, k[i].section, k[i].name, k[i].def, &e), 0);
		assert_non_null(k[i].help);
		for (size_t j = 0; j < i; j++) /* flags are unique */
			assert_string_not_equal(k[i].flag, k[j].flag);
	}
	assert_int_equal(ds_conf_check(&c, NULL), 0);
	assert_int_equal(c.max_message_bytes, 1 << 20);
	assert_string_equal(c.model, DS_DEFAULT_MODEL);
	assert_int_equal(c.socket_mode, 0660);
}

static void test_file(void **st)
{
	(void)st;
	write_file("# comment\n[model]\npath = /srv/m\nbackend = cuda\n\n[limits]\nmax_message_bytes = 2M\n"
		   "max_tokens = 100\ndefault_max_tokens = 50\n[server]\nsocket_mode = 0600\nshutdown_timeout = 2.5\n");
	ds_conf c;
	ds_conf_defaults(&c);
	ds_err e = { { 0 } };
	assert_int_equal(ds_conf_load(&c, path, &e), 0);
	assert_string_equal(c.model, "/srv/m");
	assert_string_equal(c.backend, "cuda");
	assert_int_equal(c.max_message_bytes, 2 << 20);
	assert_int_equal(c.socket_mode, 0600);
	assert_true(c.shutdown_timeout == 2.5);
	assert_int_equal(ds_conf_set_flag(&c, "max-tokens", "200", &e), 0);
	assert_int_equal(c.max_tokens, 200);
	unlink(path);
}

static void test_errors(void **st)
{
	(void)st;
	ds_conf c;
	ds_err e = { { 0 } };
	ds_conf_defaults(&c);
	write_file("[limits]\nmax_tokens = 10\n\nmax_tokenz = 5\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	assert_non_null(strstr(e.msg, ":4:"));
	assert_non_null(strstr(e.msg, "max_tokenz"));
	write_file("[model]\nthreads = 5000\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	assert_non_null(strstr(e.msg, ":2:"));
	assert_non_null(strstr(e.msg, "[0, 1024]"));
	write_file("[model]\nbackend = tpu\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "cpu, cuda, auto"));
	write_file("[limits]\nmax_clients = 12abc\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	write_file("[server]\nsocket_mode = 0999\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	write_file("[nosuch]\nx = 1\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	write_file("this is not ini\n");
	assert_int_equal(ds_conf_load(&c, path, &e), -EINVAL);
	assert_non_null(strstr(e.msg, ":1:"));
	unlink(path);
	assert_int_equal(ds_conf_load(&c, "/nonexistent/dsd.conf", &e), -ENOENT);
	ds_conf_defaults(&c);
	assert_int_equal(ds_conf_set_flag(&c, "no-such-flag", "1", &e), -ENOENT);
	assert_int_equal(ds_conf_set(&c, NULL, "max_requests_per_client", "9000", &e), 0);
	assert_int_equal(ds_conf_check(&c, &e), -EINVAL); /* over max_requests (256) */
	assert_non_null(strstr(e.msg, "limits.max_requests"));
	ds_conf_defaults(&c);
	assert_int_equal(ds_conf_set(&c, "server", "ring_bytes", "100000", &e), 0);
	assert_int_equal(ds_conf_check(&c, &e), -EINVAL); /* not a power of two */
}

static void test_diff(void **st)
{
	(void)st;
	ds_conf a, b;
	ds_conf_defaults(&a);
	b = a;
	char list[256];
	assert_int_equal(ds_conf_diff(&a, &b, 0, list, sizeof(list)), 0);
	assert_int_equal(ds_conf_set(&b, "limits", "max_tokens", "77", NULL), 0);
	assert_int_equal(ds_conf_set(&b, "model", "path", "/x", NULL), 0);
	assert_int_equal(ds_conf_diff(&a, &b, 0, list, sizeof(list)), 2);
	assert_int_equal(ds_conf_diff(&a, &b, 1, list, sizeof(list)), 1);
	assert_string_equal(list, "model.path");
}

/* conf/dsd.conf.example documents every key, commented out with its
 * default, under its section, and names its flag. */
static void test_example_documents_every_key(void **st)
{
	(void)st;
	FILE *f = fopen("conf/dsd.conf.example", "r");
	if (!f)
		f = fopen("../conf/dsd.conf.example", "r");
	assert_non_null(f);
	static char text[1 << 16];
	size_t n = fread(text, 1, sizeof(text) - 1, f);
	fclose(f);
	text[n] = 0;
	size_t nk;
	const ds_conf_key *k = ds_conf_keys(&nk);
	for (size_t i = 0; i < nk; i++) {
		char sec[64], line[128], flag[80];
		snprintf(sec, sizeof(sec), "\n[%s]\n", k[i].section);
		snprintf(line, sizeof(line), k[i].def[0] ? "\n#%s = %s\n" : "\n#%s =%s\n", k[i].name, k[i].def);
		snprintf(flag, sizeof(flag), "[--%s]", k[i].flag);
		const char *s = strstr(text, sec), *l = strstr(text, line);
		if (!s || !l || l < s || !strstr(text, flag))
			fail_msg("conf/dsd.conf.example: %s.%s (default %s, flag --%s) is not documented", k[i].section,
				 k[i].name, k[i].def, k[i].flag);
		/* and the next section header, if any, comes after it */
		const char *next = strstr(s + 1, "\n[");
		while (next && next[2] == '-')
			next = strstr(next + 1, "\n[");
		if (next && l > next && strncmp(next + 2, k[i].section, strlen(k[i].section)))
			fail_msg("conf/dsd.conf.example: %s.%s is outside its section", k[i].section, k[i].name);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_file),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_diff),
		cmocka_unit_test(test_example_documents_every_key),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
