/* cmd_tokenize.c — `dsd tokenize` and `dsd detokenize`: offline text <-> ids over JSON Lines.
 * tokenize:   each stdin line a JSON string -> one JSON array of ids (no BOS added).
 * detokenize: each stdin line a JSON array of ids -> one JSON string.
 * --tokenizer takes a tokenizer.json or a model directory holding one. A bad line stops the
 * run with its line number on stderr and exit status 1. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "daemon/commands.h"
#include "model/tokenizer.h"

static int load(const char *path, ds_tok **tok)
{
	struct stat st;
	ds_err e = { "" };
	int rc = !stat(path, &st) && S_ISDIR(st.st_mode) ? ds_tok_load_dir(path, tok, &e) :
							     ds_tok_load(path, tok, &e);
	if (rc)
		fprintf(stderr, "dsd: %s\n", e.msg);
	return rc;
}

/* Decodes the JSON string token at s (after optional whitespace) into *out with its true
 * length (a "\u0000" stays a NUL byte); returns a pointer past it or NULL. */
static const char *json_string(const char *s, char **out, size_t *len)
{
	while (*s == ' ' || *s == '\t')
		s++;
	if (*s++ != '"')
		return NULL;
	char *o = malloc(strlen(s) + 1);
	size_t n = 0;
	if (!o)
		return NULL;
	while (*s != '"') {
		unsigned char c = (unsigned char)*s;
		if (c < 0x20)
			goto bad;
		if (c != '\\') {
			o[n++] = *s++;
			continue;
		}
		s++;
		char k = *s++, r;
		switch (k) {
		case '"': case '\\': case '/': r = k; break;
		case 'b': r = '\b'; break;
		case 'f': r = '\f'; break;
		case 'n': r = '\n'; break;
		case 'r': r = '\r'; break;
		case 't': r = '\t'; break;
		case 'u': r = 0; break;
		default: goto bad;
		}
		if (k != 'u') {
			o[n++] = r;
			continue;
		}
		unsigned cp = 0;
		for (int i = 0; i < 4; i++, s++) {
			char h = *s;
			int v = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 :
				h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
			if (v < 0)
				goto bad;
			cp = cp << 4 | (unsigned)v;
		}
		if (cp >= 0xdc00 && cp < 0xe000)
			goto bad;
		if (cp >= 0xd800 && cp < 0xdc00) {
			unsigned lo = 0;
			if (s[0] != '\\' || s[1] != 'u')
				goto bad;
			for (int i = 2; i < 6; i++) {
				char h = s[i];
				int v = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 :
					h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
				if (v < 0)
					goto bad;
				lo = lo << 4 | (unsigned)v;
			}
			if (lo < 0xdc00 || lo >= 0xe000)
				goto bad;
			cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			s += 6;
		}
		if (cp < 0x80) {
			o[n++] = (char)cp;
		} else if (cp < 0x800) {
			o[n++] = (char)(0xc0 | cp >> 6);
			o[n++] = (char)(0x80 | (cp & 0x3f));
		} else if (cp < 0x10000) {
			o[n++] = (char)(0xe0 | cp >> 12);
			o[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
			o[n++] = (char)(0x80 | (cp & 0x3f));
		} else {
			o[n++] = (char)(0xf0 | cp >> 18);
			o[n++] = (char)(0x80 | ((cp >> 12) & 0x3f));
			o[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
			o[n++] = (char)(0x80 | (cp & 0x3f));
		}
	}
	*out = o;
	*len = n;
	return s + 1;
bad:
	free(o);
	return NULL;
}

static void put_json_string(const char *s, size_t n)
{
	putchar('"');
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c == '\n')
			fputs("\\n", stdout);
		else if (c == '\t')
			fputs("\\t", stdout);
		else if (c == '\r')
			fputs("\\r", stdout);
		else if (c < 0x20 || c == 0x7f)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	fputs("\"\n", stdout);
}

static int blank(const char *s)
{
	return s[strspn(s, " \t\r\n")] == 0;
}

static int parse_args(int argc, char **argv, const char *verb, const char **path, int *flag)
{
	static const struct option opts[] = {
		{ "tokenizer", required_argument, NULL, 't' },
		{ "no-special", no_argument, NULL, 'n' },
		{ "skip-special", no_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ 0, 0, 0, 0 },
	};
	int tok = !strcmp(verb, "tokenize"), c;
	const char *usage = tok ? "usage: dsd tokenize --tokenizer FILE|DIR [--no-special]\n"
				  "  stdin: one JSON string per line; stdout: one JSON array of ids per "
				  "line (no BOS added).\n  --no-special: special tokens in the text are "
				  "plain text, never control tokens.\n"
				: "usage: dsd detokenize --tokenizer FILE|DIR [--skip-special]\n"
				  "  stdin: one JSON array of ids per line; stdout: one JSON string per "
				  "line.\n";
	optind = 1;
	*path = NULL;
	*flag = 0;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		if (c == 't')
			*path = optarg;
		else if (c == 'n' && tok)
			*flag = 1;
		else if (c == 's' && !tok)
			*flag = 1;
		else {
			fputs(usage, c == 'h' ? stdout : stderr);
			return c == 'h' ? 0 : 2;
		}
	}
	if (!*path || optind != argc) {
		fputs(usage, stderr);
		return 2;
	}
	return -1;
}

int ds_cmd_tokenize(int argc, char **argv)
{
	const char *path;
	int no_special, rc = parse_args(argc, argv, "tokenize", &path, &no_special);
	if (rc >= 0)
		return rc;
	ds_tok *tok;
	if (load(path, &tok))
		return 1;
	char *line = NULL;
	size_t cap = 0, lineno = 0;
	rc = 0;
	while (getline(&line, &cap, stdin) > 0) {
		lineno++;
		if (blank(line))
			continue;
		char *text;
		size_t len, n;
		const char *end = json_string(line, &text, &len);
		if (!end || !blank(end)) {
			if (end)
				free(text);
			fprintf(stderr, "dsd tokenize: line %zu: expected one JSON string\n", lineno);
			rc = 1;
			break;
		}
		int32_t *ids;
		ds_err e = { "" };
		if (ds_tok_encode(tok, text, len, no_special ? DS_TOK_NO_SPECIAL : 0, &ids, &n, &e)) {
			free(text);
			fprintf(stderr, "dsd tokenize: line %zu: %s\n", lineno, e.msg);
			rc = 1;
			break;
		}
		putchar('[');
		for (size_t i = 0; i < n; i++)
			printf(i ? ",%d" : "%d", ids[i]);
		fputs("]\n", stdout);
		free(ids);
		free(text);
	}
	free(line);
	ds_tok_free(tok);
	if (fflush(stdout))
		rc = 1;
	return rc;
}

int ds_cmd_detokenize(int argc, char **argv)
{
	const char *path;
	int skip, rc = parse_args(argc, argv, "detokenize", &path, &skip);
	if (rc >= 0)
		return rc;
	ds_tok *tok;
	if (load(path, &tok))
		return 1;
	char *line = NULL;
	size_t cap = 0, lineno = 0;
	ssize_t len;
	rc = 0;
	while ((len = getline(&line, &cap, stdin)) > 0) {
		lineno++;
		if (blank(line))
			continue;
		cJSON *a = cJSON_ParseWithLength(line, (size_t)len);
		int n = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : -1;
		int32_t *ids = n >= 0 ? malloc(((size_t)n + 1) * sizeof(*ids)) : NULL;
		const cJSON *x;
		int k = 0, ok = ids != NULL;
		if (ok)
			cJSON_ArrayForEach(x, a) {
				if (!cJSON_IsNumber(x) || x->valuedouble != (double)(int32_t)x->valuedouble) {
					ok = 0;
					break;
				}
				ids[k++] = (int32_t)x->valuedouble;
			}
		cJSON_Delete(a);
		char *text;
		size_t tl;
		ds_err e = { "" };
		if (!ok) {
			fprintf(stderr, "dsd detokenize: line %zu: expected one JSON array of integer ids\n",
				lineno);
			rc = 1;
		} else if (ds_tok_decode(tok, ids, (size_t)k, skip ? DS_TOK_SKIP_SPECIAL : 0, &text,
					 &tl, &e)) {
			fprintf(stderr, "dsd detokenize: line %zu: %s\n", lineno, e.msg);
			rc = 1;
		} else {
			put_json_string(text, tl);
			free(text);
		}
		free(ids);
		if (rc)
			break;
	}
	free(line);
	ds_tok_free(tok);
	if (fflush(stdout))
		rc = 1;
	return rc;
}
