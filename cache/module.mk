# cache/: KV block pool accounting, prefix cache.
LIB_SRCS += $(sort $(wildcard cache/*.c))
