# tests/: each feature adds its own tests/<name>.mk fragment.
include $(sort $(filter-out tests/module.mk,$(wildcard tests/*.mk)))
