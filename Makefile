# Two entry points on a fresh machine: `make pretrain` and `make test`.
# Each creates .venv (and installs the project) when it is missing or stale.
# constraints.txt pins the versions the suite was verified with (pip's resolver needs
# minutes without it); regenerate with `.venv/bin/pip freeze --exclude-editable`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles a small CPU comm op on first use; share the cache between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# ... with the venv's ninja, whatever the caller's PATH: two ninja versions sharing that cache
# (pip's 1.13, a system 1.11) do not read each other's build log and rebuild the op every time.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The suite runs on two pytest-xdist processes: one runs the end-to-end job files one after
# another, the other every other file meanwhile (the scheduler is in tests/conftest.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --no-loadscope-reorder

.PHONY: venv pretrain test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) jobs/pretrain.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
