# Two commands on a fresh machine: `make demo` (train the digits model) and `make test`.
# The environment lives in .venv; torch is installed first, pinned, so that pip keeps the CPU wheel on a CPU-only
# machine (the local find-links wheel) and takes the CUDA build from PyPI on a GPU machine. Everything else is
# installed through requirements/lock.txt, the set the suite passed with; `make upgrade` moves it on purpose.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# accelerate launch pins OMP_NUM_THREADS=1 unless told otherwise (without --cpu): give the one process every core
THREADS ?= $(shell nproc)
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(THREADS)

.PHONY: install demo miniature digits-teach-data bench-digits bench-digits-nine bench-gpu test test-latest upgrade lint bench clean

# pip installs exactly the locked versions (constraints), downgrading anything a previous install left newer, then
# the environment is checked against the lock so that a drift fails here and not inside a test
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev,app]"
	$(PY) requirements/lockfile.py check $(LOCK)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(ACCELERATE) -m finetune finetune/recipes/digits_unconditional.yaml

# the folders the digits_teach_*.yaml and digits_style_lora.yaml recipes train on (5 nines captioned "a handwritten
# digit sks"; thick and plain digits for the style), in seconds; `make bench-digits` writes them too
digits-teach-data: $(STAMP)
	$(PY) -m benchmarks.bench_digits_finetune --data-only

# the miniature text-to-image models, nines held out: the autoencoder, then on its latents the UNet (DDPM,
# StableDiffusionPipeline) and the SD3 transformer (flow matching, StableDiffusion3Pipeline); see README for times
miniature: $(STAMP)
	test -f outputs/digits-autoencoder/config.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_autoencoder.yaml
	$(ACCELERATE) -m finetune finetune/recipes/digits_text_to_image.yaml
	$(ACCELERATE) -m finetune finetune/recipes/digits_flow_text_to_image.yaml

# what LoRA, DreamBooth (+prior, LoRA), Textual Inversion and a style LoRA teach the UNet miniature, averaged over
# held-out digits and seeds: a miniature trained without each digit (cached in outputs/digits-miniatures, reused;
# 400 steps instead of the recipe's 1500 drew only 61-65% of the seen digits right), every method on every digit and
# seed. One process per digit, one thread each (on shared cores, two threads a process ran the autoencoder 5x slower
# than one), then their runs combined into outputs/bench-digits/average/results.md (mean [min-max], then per digit)
# and results.json
BENCH_DIGITS ?= 9 3 5
BENCH_DIGITS_SEEDS ?= 0 1
BENCH_DIGITS_MINIATURE_STEPS ?= 1500
bench-digits: $(STAMP)
	test -f outputs/digits-autoencoder/config.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_autoencoder.yaml
	mkdir -p outputs/bench-digits
	pids=""; for digit in $(BENCH_DIGITS); do \
		OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench_digits_finetune --overwrite --work outputs/bench-digits/holdout-$$digit \
			--models unet --per-prompt 16 --base-overrides train.max_train_steps=$(BENCH_DIGITS_MINIATURE_STEPS) \
			--held-out-digits $$digit --seeds $(BENCH_DIGITS_SEEDS) > outputs/bench-digits/holdout-$$digit.log 2>&1 & \
		pids="$$pids $$!"; \
	done; for pid in $$pids; do \
		wait $$pid || { echo "a held-out digit's run failed: see outputs/bench-digits/holdout-*.log"; exit 1; }; \
	done
	$(PY) -m benchmarks.bench_digits_finetune --overwrite --work outputs/bench-digits/average --per-prompt 16 \
		--combine $(foreach digit,$(BENCH_DIGITS),outputs/bench-digits/holdout-$(digit))

# the nine alone, one seed, on both miniatures as their recipes train them (make miniature), side by side, and how
# well a ControlNet on the UNet miniature follows edge maps of digits: results.md and PNG grids
bench-digits-nine: $(STAMP)
	test -f outputs/digits-autoencoder/config.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_autoencoder.yaml
	test -f outputs/digits-text-to-image/model_index.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_text_to_image.yaml
	test -f outputs/digits-flow-text-to-image/model_index.json || \
		$(ACCELERATE) -m finetune finetune/recipes/digits_flow_text_to_image.yaml
	OMP_NUM_THREADS=$(THREADS) $(PY) -m benchmarks.bench_digits_finetune --overwrite

# LoRA speed on one GPU: SD 1.5 / SDXL / Flux architectures with random weights, 512 and 1024 px, batch 1 and 4,
# each speed lever alone; figures to outputs/bench-gpu.json. BENCH_GPU_ARGS="--dry-run" prints the plan on any
# machine; "--diffusers PATH" runs the diffusers example scripts on the same work (see benchmarks/bench_gpu.py)
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.bench_gpu $(BENCH_GPU_ARGS)

# two workers, one thread each: the suite's jobs are small, so two at once use both cores better than one job with
# two threads (and in-process and subprocess runs then do their arithmetic the same way)
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

# the suite against the newest release of every dependency, in a separate venv, without the lock and past the upper
# bounds pyproject.toml sets for known breaks: finds the next break (or the end of a known one) before users do.
# It first prints which packages moved beyond the lock; the tested environment (.venv) is not touched.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(LATEST)/bin/python -m pip install -q --no-deps -e .
	$(LATEST)/bin/python -m pip install -q $$($(PYTHON) requirements/lockfile.py unbounded)
	$(LATEST)/bin/python requirements/lockfile.py moved $(LOCK)
	OMP_NUM_THREADS=1 $(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile

# move the lock on purpose: resolve the newest releases in a scratch venv and write them to the lock; then run
# `make test` (it reinstalls from the new lock) and commit requirements/lock.txt only if it passes
upgrade:
	rm -rf $(VENV)-upgrade
	$(PYTHON) -m venv $(VENV)-upgrade
	$(VENV)-upgrade/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(VENV)-upgrade/bin/python -m pip install -q -e ".[dev,app]"
	$(VENV)-upgrade/bin/python requirements/lockfile.py moved $(LOCK)
	$(VENV)-upgrade/bin/python requirements/lockfile.py freeze > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV)-upgrade
	@echo "$(LOCK) rewritten: run 'make test', then commit it if the suite passes (git diff $(LOCK) shows what moved)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache $(LATEST) $(VENV)-upgrade
