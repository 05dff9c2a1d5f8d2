# The two quick-start commands (`make demo`, `make test`) build their own
# environment in $(VENV) first. TORCH picks the torch release (from PyPI on Linux: the
# CUDA build; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu adds the CPU build,
# whose 2.13.0+cpu pip then prefers), e.g. `make TORCH=torch demo` for the newest.
PY    ?= python3
VENV  ?= .venv
TORCH ?= torch==2.13.0
BIN   := $(VENV)/bin

.PHONY: demo test lint protos clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/kd demo --out demo-out

# compileall first: where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) no import
# writes a .pyc, so every `python -m kd` a test starts compiled kd's sources again (~0.2-0.4 s of CPU
# each, hundreds of processes a run); compileall writes them whatever that variable says, and an import
# still recompiles any source changed since.
# -n 2: two pytest workers (pytest-xdist), each test file on one of them (its module fixtures built once).
# Most of a serial run's time is one process waiting for another (a kd subprocess importing torch, a
# server, a signal); two workers keep both CPU cores of the CI machine busy.
test: $(VENV)/.installed
	$(BIN)/python -m compileall -q kd cache teacher_server student_trainer tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

protos: $(VENV)/.installed
	$(BIN)/python -m kd.protogen

clean:
	rm -rf $(VENV) demo-out .pytest_cache
