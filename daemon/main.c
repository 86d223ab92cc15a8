/* main.c — the dsd binary: dispatches its verbs (see commands.h). With no
 * verb, or an option first, it serves. */
#include <stdio.h>
#include <string.h>

#include "daemon/commands.h"

static const struct {
	const char *name;
	int (*fn)(int, char **);
	const char *help;
} verbs[] = {
	{ "inspect", ds_cmd_inspect, "summarize a model directory" },
	{ "logits", ds_cmd_logits, "write the logits of a token sequence as .npy" },
	{ "generate", ds_cmd_generate, "generate text offline" },
	{ "serve", ds_cmd_serve, "run the daemon (the default with no verb)" },
	{ "check-config", ds_cmd_check_config, "validate the configuration and print it" },
	{ "tokenize", ds_cmd_tokenize, "JSON strings (one a line) to arrays of token ids" },
	{ "detokenize", ds_cmd_detokenize, "arrays of token ids (one a line) to JSON strings" },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: dsd [VERB] [OPTIONS]\n\nverbs:\n");
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		fprintf(f, "  %-13s %s\n", verbs[i].name, verbs[i].help);
	fprintf(f, "\n`dsd VERB --help` describes a verb's options.\n");
}

int main(int argc, char **argv)
{
	if (argc < 2 || argv[1][0] == '-') {
		if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
			usage(stdout);
			return 0;
		}
		return ds_cmd_serve(argc, argv); /* no verb, or options first: serve */
	}
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
		if (!strcmp(argv[1], verbs[i].name))
			return verbs[i].fn(argc - 1, argv + 1);
	if (!strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	fprintf(stderr, "dsd: unknown verb '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
