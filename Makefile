# mmfusion: `make demo` runs the main job, `make test` runs every check; both build .venv from nothing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: install install-dev browser postgres demo test test-slow gpu-check lab data readme

# settings.ini declares compatible ranges; constraints.txt holds the exact versions make installs (and the tests ran with)
$(VENV)/.installed: setup.py settings.ini constraints.txt
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4/1048576)}'); [ "$$free" -ge 8 ] || \
	  echo "warning: $$free GiB free here; the environment (PyTorch's CUDA build) needs about 8 GiB, the install may fail with 'No space left on device'"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed constraints.txt
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e ".[dev]"
	touch $@

# the venv registered as the Jupyter kernel `mmfusion` (the notebooks' kernelspec: .ci/set_kernelspec.py; JupyterLab
# comes with the dev extras), and nbdev's git hooks (notebook merge driver, trust after merge) pointed at this venv's commands
$(VENV)/.installed-lab: $(VENV)/.installed-dev
	$(PY) -m ipykernel install --sys-prefix --name mmfusion --display-name mmfusion >/dev/null
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(VENV)/bin/nbdev_install_hooks && \
	  git config --local merge.nbdev-merge.driver "$(abspath $(VENV))/bin/nbdev_merge %O %A %B %P" && \
	  printf '#!/bin/bash\n"%s"/bin/nbdev_trust\n' "$(abspath $(VENV))" > "$$(git rev-parse --git-path hooks)/post-merge"; fi
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev $(VENV)/.installed-lab

# JupyterLab on loopback with a token; kernels start in their notebook's folder, so the notebooks' relative paths work
LAB_PORT ?= 8888
lab: install-dev
	@token=$$($(PY) -c 'import secrets; print(secrets.token_hex(24))'); \
	echo "JupyterLab: http://127.0.0.1:$(LAB_PORT)/lab/tree/nbs/index.ipynb?token=$$token   (Ctrl-C stops it)"; \
	exec $(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --ServerApp.port_retries=0 \
	  --IdentityProvider.token=$$token --ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# headless Chromium for the browser tests (Debian's package; needs root or an existing install, or CHROMIUM=/path/to/chromium).
# Where it cannot be installed, make test goes on and the browser tests FAIL saying how to install it (never skipped).
browser:
	@test -n "$$CHROMIUM" || command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "Chromium is not installed and could not be (needs root): sudo apt-get install chromium, or set CHROMIUM=/path/to/chromium; the browser tests will fail"
	@$${CHROMIUM:-chromium} --version 2>/dev/null | head -n 1 || true

# Debian's PostgreSQL server binaries for tests/test_tune.py (the test starts a private server itself; nothing is enabled here).
# Without root or apt the tune test says so; make test goes on.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || echo "PostgreSQL is not installed and could not be (needs root): sudo apt-get install postgresql"
	@ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -n 1 || true

SCENARIO ?= weld
demo: install
	$(VENV)/bin/mmfusion demo --root data --out runs/demo --scenario $(SCENARIO)

data: install
	$(VENV)/bin/mmfusion data generate --root data
	$(PY) benchmarks/ceilings.py --readme-only  # each README's ceilings section, from benchmarks/results/*.json

# every check a change must pass (~20 min on 2 cores); `make test-slow` runs the rest
test: install-dev browser postgres
	$(VENV)/bin/nbdev_export
	@if [ -n "$$(git status --porcelain -- mmfusion)" ]; then echo "nbdev_export changed mmfusion/ (the library and the notebooks disagree):"; git status --short -- mmfusion; exit 1; fi
	$(VENV)/bin/nbdev_clean
	@if [ -n "$$(git status --porcelain -- nbs)" ]; then echo "nbdev_clean changed nbs/ (notebooks are not clean):"; git status --short -- nbs; exit 1; fi
	OMP_NUM_THREADS=1 $(VENV)/bin/nbdev_test --n_workers 2
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest tests/ -p no:cacheprovider $(PYTEST_WORKERS) -m "not slow"

# pytest on two processes; a test file's tests stay on one process (module fixtures built once) but test_planted_truth's
# independent cases (more than half the serial time) are dealt out one by one (tests/conftest.py); PYTEST_WORKERS= runs serially
PYTEST_WORKERS ?= -n 2 --dist loadgroup

# what make test leaves out: the `#| slow` notebook cells (each notebook that has some, run whole with --flags slow) and
# the tests marked slow. Run it before changing prose that quotes what they compute. Prints its time.
test-slow: install-dev browser postgres
	@start=$$(date +%s); \
	names=$$(grep -l '"#| slow' nbs/[!_]*.ipynb nbs/tutorials/[!_]*.ipynb | xargs -n1 basename | sed 's/\.ipynb$$//' | paste -sd'|'); \
	echo "nbdev_test --flags slow: $$names"; \
	OMP_NUM_THREADS=1 $(VENV)/bin/nbdev_test --flags slow --n_workers 2 --file_re "^($$names)\.ipynb$$"; nb=$$?; \
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest tests/ -p no:cacheprovider $(PYTEST_WORKERS) -m slow; py=$$?; \
	if [ $$py -eq 5 ]; then py=0; fi; \
	echo "make test-slow: $$(( $$(date +%s) - start )) s (slow notebook cells: exit $$nb; pytest -m slow: exit $$py)"; \
	exit $$(( nb > py ? nb : py ))

# on a GPU machine: the #| cuda notebook cells (nbdev_test --flags cuda), a short bf16 fused-detector training, the detection
# latency benchmark on the GPU -> benchmarks/results/gpu_check.json (+ detection_latency_gpu.json); exits 2 saying so without a GPU
gpu-check: install-dev
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONHASHSEED=0 $(PY) benchmarks/gpu_check.py

readme: install-dev
	$(PY) .ci/render_readme.py

# the docs site in _docs/: nbdev's Quarto pipeline where `quarto` exists, else the same pages via mkdocs (.ci/build_docs.py)
.PHONY: docs
docs: install-dev
	$(PY) .ci/build_docs.py
