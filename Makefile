# The two commands: `make serve` and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch sits on local disk; installing it first, pinned, stops the
# project's `torch>=2.3` from pulling the multi-gigabyte CUDA wheels.
TORCH := torch==2.13.0

.PHONY: serve test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/imh serve

# A real redis-server must be reachable for the Redis tests: IMH_TEST_REDIS_URL, else
# 127.0.0.1:6379, else tests/conftest.py starts redis-server on a free loopback port
# (installed here with apt-get when missing).
test: $(VENV)/.installed
	@if [ -z "$$IMH_TEST_REDIS_URL" ] && ! command -v redis-server >/dev/null 2>&1 \
	    && ! (redis-cli -p 6379 ping 2>/dev/null | grep -q PONG); then \
	  echo "installing redis-server"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 || \
	    echo "warning: could not install redis-server"; \
	fi
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.kernels
	$(PY) -m benchmarks.sbn
	$(PY) -m benchmarks.sbp
	$(PY) -m benchmarks.serve
	$(PY) -m benchmarks.frechet

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
