# tests/packaging/: `dsctl doctor` runs in `make check`; the package tests
# (check_packaging.sh) need root and install packages: `make check-packaging`.
ifneq ($(filter dsctl,$(PROGS)),)
SHELL_TESTS += tests/packaging/doctor.sh
endif
