/* Bad model input gets an error naming the file and the tensor, never a
 * crash: corrupt safetensors headers, truncated data, missing or misshapen
 * tensors, bad config values, a bad shard index. */
#include <cjson/cJSON.h>
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

#include "model/model.h"
#include "tests/fixture_util.h"

static char tmp[512];
static char src[600];

static int setup(void **st)
{
	(void)st;
	snprintf(src, sizeof(src), "%s/tests/fixtures/v2lite", fx_srcdir());
	return fx_tmpdir(tmp, sizeof(tmp));
}

static int teardown(void **st)
{
	(void)st;
	fx_rmtree(tmp);
	return 0;
}

static void put(const char *name, const void *data, size_t len)
{
	char p[700];
	snprintf(p, sizeof(p), "%s/%s", tmp, name);
	FILE *f = fopen(p, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, len, f), len);
	fclose(f);
}

static void copy_in(const char *name)
{
	char a[700], b[700];
	snprintf(a, sizeof(a), "%s/%s", src, name);
	snprintf(b, sizeof(b), "%s/%s", tmp, name);
	assert_int_equal(fx_copy_file(a, b), 0);
}

/* A safetensors file from a header text and a data size (filled with 0x3c). */
static void put_st(const char *name, const char *hdr, size_t data_len)
{
	size_t hl = strlen(hdr);
	uint8_t *b = malloc(8 + hl + data_len);
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)(hl >> (8 * i));
	memcpy(b + 8, hdr, hl);
	memset(b + 8 + hl, 0x3c, data_len);
	put(name, b, 8 + hl + data_len);
	free(b);
}

/* Opens tmp as a model and expects failure with each needle in the message. */
static void expect_error(const char *n1, const char *n2)
{
	ds_model *m = NULL;
	ds_err e = { { 0 } };
	int rc = ds_model_open(tmp, 0, &m, &e);
	if (rc == 0)
		fail_msg("opened a bad model (wanted '%s')", n1);
	assert_true(rc < 0);
	assert_null(m);
	if (n1 && !strstr(e.msg, n1))
		fail_msg("message '%s' lacks '%s'", e.msg, n1);
	if (n2 && !strstr(e.msg, n2))
		fail_msg("message '%s' lacks '%s'", e.msg, n2);
}

static void fresh_copy(void)
{
	fx_rmtree(tmp);
	assert_int_equal(fx_tmpdir(tmp, sizeof(tmp)), 0);
	copy_in("config.json");
	copy_in("model.safetensors");
}

static void test_reference_opens(void **st)
{
	(void)st;
	fresh_copy();
	ds_model *m;
	ds_err e = { { 0 } };
	if (ds_model_open(tmp, 0, &m, &e))
		fail_msg("%s", e.msg);
	assert_int_equal(m->n_unused, 0);
	ds_model_free(m);
}

static void test_truncated(void **st)
{
	(void)st;
	fresh_copy();
	char p[700];
	snprintf(p, sizeof(p), "%s/model.safetensors", tmp);
	FILE *f = fopen(p, "rb");
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fclose(f);
	assert_int_equal(truncate(p, n / 2), 0);
	expect_error("model.safetensors", "outside the data");
	assert_int_equal(truncate(p, 5), 0);
	expect_error("model.safetensors", "truncated");
}

static void test_header_errors(void **st)
{
	(void)st;
	fresh_copy();
	uint8_t b[18] = { 0xe8, 0x03 }; /* header length 1000, file of 18 bytes */
	put("model.safetensors", b, sizeof(b));
	expect_error("model.safetensors", "past the end");
	put_st("model.safetensors", "{\"a\": {\"dtype\": \"F32\", ", 16);
	expect_error("model.safetensors", "not a JSON object");
	put_st("model.safetensors", "{\"a\": {\"dtype\": \"F9\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16);
	expect_error("'a'", "unknown dtype");
	put_st("model.safetensors", "{\"a\": {\"dtype\": \"F32\", \"shape\": [5], \"data_offsets\": [0, 16]}}", 16);
	expect_error("'a'", "bytes for shape");
	put_st("model.safetensors",
	       "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
	       " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}", 32);
	expect_error("overlap", "'a'");
	put_st("model.safetensors", "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [16, 32]}}", 16);
	expect_error("'a'", "outside the data");
	put_st("model.safetensors", "{\"a\": {\"dtype\": \"F32\", \"shape\": [-4], \"data_offsets\": [0, 16]}}", 16);
	expect_error("'a'", "bad shape");
}

/* Rewrites the fixture's header with a change and the same data. */
static void rewrite(const char *drop, const char *reshape)
{
	ds_st_header h;
	ds_err e;
	assert_int_equal(ds_st_read_header(strcat(strcpy((char[700]){ 0 }, src), "/model.safetensors"), &h, &e), 0);
	cJSON *o = cJSON_CreateObject();
	for (size_t i = 0; i < h.n; i++) {
		const ds_st_tensor *t = &h.tensors[i];
		if (drop && !strcmp(t->name, drop))
			continue;
		cJSON *j = cJSON_AddObjectToObject(o, t->name);
		cJSON_AddStringToObject(j, "dtype", ds_dtype_name(t->dtype));
		cJSON *sh = cJSON_AddArrayToObject(j, "shape");
		if (reshape && !strcmp(t->name, reshape)) {
			/* same bytes, transposed shape */
			cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[1]));
			cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[0]));
		} else {
			for (int d = 0; d < t->ndim; d++)
				cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[d]));
		}
		cJSON *off = cJSON_AddArrayToObject(j, "data_offsets");
		cJSON_AddItemToArray(off, cJSON_CreateNumber((double)t->begin));
		cJSON_AddItemToArray(off, cJSON_CreateNumber((double)t->end));
	}
	char *text = cJSON_PrintUnformatted(o);
	size_t data_len = h.file_size - h.data_start;
	char p[700];
	snprintf(p, sizeof(p), "%s/model.safetensors", src);
	FILE *f = fopen(p, "rb");
	uint8_t *data = malloc(data_len);
	fseek(f, (long)h.data_start, SEEK_SET);
	assert_int_equal(fread(data, 1, data_len, f), data_len);
	fclose(f);
	size_t hl = strlen(text);
	uint8_t *b = malloc(8 + hl + data_len);
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)(hl >> (8 * i));
	memcpy(b + 8, text, hl);
	memcpy(b + 8 + hl, data, data_len);
	put("model.safetensors", b, 8 + hl + data_len);
	free(b);
	free(data);
	free(text);
	cJSON_Delete(o);
	ds_st_header_free(&h);
}

static void test_missing_and_misshapen(void **st)
{
	(void)st;
	fresh_copy();
	rewrite("model.layers.1.mlp.experts.3.up_proj.weight", NULL);
	expect_error("missing tensor", "model.layers.1.mlp.experts.3.up_proj.weight");
	rewrite(NULL, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight");
	expect_error("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "expected");
}

static void put_config_edit(const char *key, double value)
{
	char p[700];
	snprintf(p, sizeof(p), "%s/config.json", src);
	FILE *f = fopen(p, "rb");
	char buf[1 << 16];
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	cJSON *o = cJSON_Parse(buf);
	cJSON_ReplaceItemInObject(o, key, cJSON_CreateNumber(value));
	char *t = cJSON_Print(o);
	put("config.json", t, strlen(t));
	free(t);
	cJSON_Delete(o);
}

static void test_config_errors(void **st)
{
	(void)st;
	fresh_copy();
	put_config_edit("num_experts_per_tok", 100);
	expect_error("config.json", "num_experts_per_tok");
	put_config_edit("kv_lora_rank", -3);
	expect_error("config.json", "kv_lora_rank");
	put_config_edit("intermediate_size", 7);
	expect_error("model.layers.0.mlp.gate_proj.weight", "expected");
	put("config.json", "{\"vocab_size\": ", 15);
	expect_error("config.json", "not a JSON object");
	fresh_copy();
	char p[700];
	snprintf(p, sizeof(p), "%s/config.json", tmp);
	unlink(p);
	expect_error("config.json", NULL);
}

static void test_index_errors(void **st)
{
	(void)st;
	fresh_copy();
	const char *idx = "{\"weight_map\": {\"model.embed_tokens.weight\": \"model.safetensors\","
			  " \"no.such.tensor\": \"model.safetensors\"}}";
	put("model.safetensors.index.json", idx, strlen(idx));
	expect_error("no.such.tensor", "missing");
	const char *esc = "{\"weight_map\": {\"model.embed_tokens.weight\": \"../etc/passwd\"}}";
	put("model.safetensors.index.json", esc, strlen(esc));
	expect_error("bad shard name", NULL);
	put("model.safetensors.index.json", "[1,2]", 5);
	expect_error("weight_map", NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reference_opens),   cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_header_errors),     cmocka_unit_test(test_missing_and_misshapen),
		cmocka_unit_test(test_config_errors),     cmocka_unit_test(test_index_errors),
	};
	return cmocka_run_group_tests_name("model_errors", tests, setup, teardown);
}
