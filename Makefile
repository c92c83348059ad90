# One command sets up and runs the main job (`make demo`); one runs the tests (`make test`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GLUE data: GLUE_DIR when set (it must exist), else ../shared/glue when present; with neither, `train` takes RTE
# from the hub when online, else from the example set bundled with the package (diffcli/data/example-glue).
GLUE_DIR ?= $(wildcard ../shared/glue)
DATA_DIR_ARG := $(if $(GLUE_DIR),--data-dir $(GLUE_DIR))
DEMO := demo-out
TORCH_INDEX ?=

.PHONY: setup test demo bench completions clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# CPU torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build. Where pip's index
	# serves the CUDA wheel for this pin (plain PyPI on Linux), TORCH_INDEX=https://download.pytorch.org/whl/cpu.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test,bench,plot]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -q

# Main job: learn a 0.5% diff of the bundled MiniLM on RTE, pack it, rebuild the model, report.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/diffprune train --task rte $(DATA_DIR_ARG) --sparsity 0.5% --max-train-samples 512 \
		--epochs 1 --fixmask-epochs 1 -o $(DEMO)/ckpt
	$(BIN)/diffprune pack $(DEMO)/ckpt -o $(DEMO)/rte.diff
	$(BIN)/diffprune verify $(DEMO)/rte.diff --base minilm
	$(BIN)/diffprune apply minilm $(DEMO)/rte.diff -o $(DEMO)/merged
	$(BIN)/diffprune inspect $(DEMO)/rte.diff

completions: setup
	$(BIN)/python completions/generate.py

clean:
	rm -rf $(DEMO) .pytest_cache
