# The two commands a newcomer needs:
#   make serve   start the inference server on the embedded default model (http://127.0.0.1:8000)
#   make test    run the test suite (CPU; Triton kernels through Triton's interpreter)
# Both create ./.venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
# A CPU machine without CUDA gets the CPU build; set TORCH_SPEC to pin another.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install serve test test-fast lint mutation gpu clean

$(BIN)/stream-attention-benchmark: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all,dev]"
	@touch $@

install: $(BIN)/stream-attention-benchmark

serve: install
	$(BIN)/stream-attention-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -m "not gpu" -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not gpu and not slow" -q $(ARGS)

lint: install
	$(BIN)/ruff check stream_attention tests benchmarks examples

# Mutation testing (slow; not in CI): config in pyproject.toml [tool.mutmut], results and the
# surviving mutants worth killing in docs/TESTING.md. MUTANTS="name*" runs a subset.
MUTATION_JOBS ?= 2
mutation: install
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/mutmut results

# On the GPU machine (no network): runs the GPU tests and benchmarks, JSON under $$OUT.
gpu:
	bash scripts/gpu_run.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache mutants
