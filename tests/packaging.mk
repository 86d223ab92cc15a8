# tests/packaging/: `dsctl doctor` runs in `make check`; the package tests
# (manpages.sh, check_packaging.sh) run from `make check-packaging`.
SHELL_TESTS += tests/packaging/doctor.sh
