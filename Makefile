# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; override for CUDA, e.g. make TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ...".
TORCH_SPEC ?= torch==2.13.0
OUT ?= out/demo
# Test processes (pytest-xdist), one torch thread each: "auto" is one per CPU core.
TEST_WORKERS ?= auto

.PHONY: demo app test slow-test mutation-check install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(PIP_EXTRA)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) examples/demo.py --out $(OUT)

# The editing page on http://127.0.0.1:7860 (Gradio: the [app] extra, installed on first use).
app: install
	$(PY) -c "import gradio" 2>/dev/null || $(PY) -m pip install --quiet -e ".[app]"
	$(VENV)/bin/fisedit app --data out/app

test: install
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The slowest tests on a CPU, from fifteen seconds to minutes each (Inductor programs, dynamo traces, a real Ray
# cluster, the serving benchmark's servers, whole LoRA and IP-Adapter sessions): left out of `make test`, run by CI.
slow-test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

# Break the code on purpose, one way at a time, and check that the tests guarding it fail (tools/mutation_check.py).
mutation-check: install
	$(PY) tools/mutation_check.py --no-baseline

clean:
	rm -rf $(VENV) out
