/* gen_conf_keys.c — prints the KEYS section of dsd.conf(5) from conf/'s
 * settings table, so the manual page says what the code does. Run by
 * `make man-conf`, which splices the output into packaging/man/dsd.conf.5;
 * tests/packaging/manpages.sh fails when the committed page is stale. */
#include <stdio.h>
#include <string.h>

#include "conf/conf.h"

static const char *size_text(double v, char *out, size_t n)
{
	static const struct { double f; const char *u; } units[] = {
		{ 1024.0 * 1024 * 1024, "G" }, { 1024.0 * 1024, "M" }, { 1024.0, "K" } };
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (v >= units[i].f && (long long)(v / units[i].f) * units[i].f == v) {
			snprintf(out, n, "%g%s", v / units[i].f, units[i].u);
			return out;
		}
	}
	snprintf(out, n, "%g", v);
	return out;
}

/* roff: a leading dot or quote would be a request; backslashes escape. */
static void roff_text(const char *s)
{
	if (*s == '.' || *s == '\'')
		fputs("\\&", stdout);
	for (; *s; s++) {
		if (*s == '\\')
			fputs("\\e", stdout);
		else if (*s == '-')
			fputs("\\-", stdout);
		else
			putchar(*s);
	}
}

int main(void)
{
	size_t n;
	const ds_conf_key *k = ds_conf_keys(&n);
	const char *section = "";
	char lo[32], hi[32];

	for (size_t i = 0; i < n; i++, k++) {
		if (strcmp(section, k->section)) {
			section = k->section;
			printf(".SS [%s]\n", section);
		}
		const char *type = k->type == DS_CONF_T_INT ? "integer" : k->type == DS_CONF_T_SIZE ? "size"
				   : k->type == DS_CONF_T_DOUBLE ? "number" : k->type == DS_CONF_T_MODE ? "octal mode"
				   : "string";
		printf(".TP\n.BR %s \" = \" \\fI%s\\fR\n", k->name, type);
		roff_text(k->help);
		if (k->choices) {
			printf(" (one of:");
			for (const char *const *c = k->choices; *c; c++)
				printf(" \\fB%s\\fR", *c);
			printf(")");
		}
		printf(".\n");
		if (k->type == DS_CONF_T_SIZE)
			printf("Range %s to %s.\n", size_text(k->min, lo, sizeof(lo)), size_text(k->max, hi, sizeof(hi)));
		else if ((k->type == DS_CONF_T_INT || k->type == DS_CONF_T_DOUBLE) && (k->min || k->max))
			printf("Range %g to %.10g.\n", k->min, k->max);
		if (k->def[0]) {
			printf("Default: \\fB");
			roff_text(k->def);
			printf("\\fR.\n");
		} else {
			printf("Default: empty.\n");
		}
		printf("Option: \\fB\\-\\-");
		roff_text(k->flag);
		printf("\\fR.\n%s\n", k->reloadable ? "Reloaded on SIGHUP." : "Takes effect at the next start.");
	}
	return 0;
}
