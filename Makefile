# cprd: `make demo` and `make check` are the two quick-start commands (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup check lint test test-fast demo bench deb kexec-e2e faults clean

setup:
	bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff format --check cprd tests scripts
	$(VENV)/bin/ruff check cprd tests scripts
	$(VENV)/bin/mypy

# The whole suite but the fault-style tests: lint, types, and every test (real QEMU guests
# included).  Under 15 minutes here; the fault-style tests run in `make faults`.
check: lint
	$(VENV)/bin/pytest -ra -m "not faults" $(PYTEST_ARGS)

# Unit tests only: no guests.
test-fast: setup
	$(VENV)/bin/pytest -ra -m "not qemu" $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/bench.py

# Issues 8 and 16: a virtual host (under TCG, cprd from its .deb) does a real kexec and
# gets its VMs back; prints the figures. DIST=trixie (default): Debian 13, plain
# `systemctl kexec`, saved under logind's delay lock. DIST=bookworm: Debian 12, plain
# `systemctl kexec`, saved by cprd-kexec-guard.service. About 10-15 minutes here.
kexec-e2e: setup
	$(PY) scripts/kexec_e2e.py --dist "$(or $(DIST),trixie)" $(KEXEC_E2E_ARGS)

# Issue 12: the fault-style tests (hostile guest agents, SIGSTOP/ENOSPC/SIGKILL mid-save, the
# fault cells, 32 guests at once), then every journalled step x every fault on real guests
# (tests/fault_matrix.py).  The matrix slice: every step once, every fault once and the end of a
# live save (step stopping) with every fault; FULL=1 the whole matrix.  Prints the matrix and
# `N passed, M failed`; fails on any FAIL or a cell count short of the plan.
faults: setup
	$(VENV)/bin/pytest -ra -m faults $(PYTEST_ARGS)
	PYTHONPATH=$(CURDIR) $(PY) tests/fault_matrix.py $(if $(filter 1,$(FULL)),--full) $(FAULTS_ARGS)

# The Debian package, into build/deb (see packaging/build-deb.sh). DIST=trixie|bookworm;
# default: this machine's release if it is one of the two, else trixie.
deb: setup
	packaging/build-deb.sh --dist "$(DIST)" build/deb

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
