# The two quick-start commands (`make demo`, `make test`) build their own
# environment in $(VENV) first. TORCH picks the torch release (from PyPI on Linux: the
# CUDA build; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu adds the CPU build,
# whose 2.13.0+cpu pip then prefers), e.g. `make TORCH=torch demo` for the newest.
PY    ?= python3
VENV  ?= .venv
TORCH ?= torch==2.13.0
BIN   := $(VENV)/bin

.PHONY: demo test lint protos clean gpu-wheels

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
# still recompiles any source changed since. Two parts (pyproject's `serial` marker): most tests on two
# pytest-xdist workers, a whole file per worker (module fixtures start one server each); then the
# torchrun and wall-clock tests alone, so they never share the two cores with another worker.
test: $(VENV)/.installed
	$(BIN)/python -m compileall -q kd cache teacher_server student_trainer tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The wheels .ci/gpu-check installs on a GPU machine with no network (its torch kept): kd's
# packages that such a machine's image lacks or has too old, for its Python (GPU_PY).
GPU_PY ?= 3.12
GPU_WHEELS ?= grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 lmdb==3.0.0
gpu-wheels:
	for w in $(GPU_WHEELS); do $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $$w || exit 1; done

protos: $(VENV)/.installed
	$(BIN)/python -m kd.protogen

clean:
	rm -rf $(VENV) demo-out .pytest_cache
