# Two commands on a fresh machine: `make demo` (train the digits model) and `make test`.
# The environment lives in .venv; torch is installed first, pinned, so that pip keeps the CPU wheel on a CPU-only
# machine (the local find-links wheel) and takes the CUDA build from PyPI on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# accelerate launch pins OMP_NUM_THREADS=1 unless told otherwise (without --cpu): give the one process every core
THREADS ?= $(shell nproc)
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(THREADS)

.PHONY: install demo miniature bench-digits test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,app]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(ACCELERATE) -m finetune finetune/recipes/digits_unconditional.yaml

# the miniature text-to-image model (autoencoder, then latent diffusion with the nines held out), ~12 min on 2 cores
miniature: $(STAMP)
	test -f outputs/digits-autoencoder/config.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_autoencoder.yaml
	$(ACCELERATE) -m finetune finetune/recipes/digits_text_to_image.yaml

# what LoRA, DreamBooth (+prior, LoRA) and Textual Inversion teach the miniature model: results.md and PNG grids
bench-digits: $(STAMP)
	test -f outputs/digits-text-to-image/model_index.json || $(MAKE) miniature
	OMP_NUM_THREADS=$(THREADS) $(PY) -m benchmarks.bench_digits_finetune --overwrite

# two workers, one thread each: the suite's jobs are small, so two at once use both cores better than one job with
# two threads (and in-process and subprocess runs then do their arithmetic the same way)
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
