# model/: config, safetensors, weights, the CPU reference engine, sampler, tokenizer.
LIB_SRCS += $(sort $(wildcard model/*.c))
