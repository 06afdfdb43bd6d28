# Two commands on a fresh machine: `make demo` and `make test`. Each creates (or reuses) the
# local venv and installs the package with the exact versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo
BITS ?= w4a4
BENCH_ARGS ?= --quick
# pytest-xdist workers for `make test` (auto: one per CPU). --dist loadfile keeps each test file in
# one worker, so a module's fixtures (a demo run, a local Ray) are built once, not once per worker;
# --no-loadscope-reorder hands files out in collection order, which tests/conftest.py sorts costliest
# first (xdist's default order, most tests first, left the longest files for the end).
TEST_WORKERS ?= auto

# OpenMP threads that busy-wait make torch several times slower when anything else shares the
# two cores (measured: 24 vs 136 img/s training); passive waiting costs nothing when idle.
export OMP_WAIT_POLICY ?= PASSIVE

# glibc hands freed memory back to the kernel and maps big tensors afresh, so every training step
# faulted its activations in again (131 of 985 CPU s of a fresh `make demo` were system time).
# Keep freed memory in the heap (glibc's documented malloc tunables; 32 MiB is the largest mmap
# threshold glibc accepts). Measured on one epoch of θ0 training, 2 threads: minor page faults
# 1.4-1.8 M -> 0.1 M, system time 3.9-4.7 -> 1.0-1.2 s, the same trained weights (BENCHMARKS.md,
# issue 22). Numbers are unchanged: only where the allocator gets its pages from moves.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456

.PHONY: setup demo demo-segmentation test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[examples,dev,distributed]"
	touch $(STAMP)

# classification, and the small segmentation case (half-width U-Net on digit scenes: train,
# adapt, RTN and HDRQ, merge, export, validate, one mask PNG per target) under $(OUT)/segmentation.
# The two are independent: segmentation runs alongside at the lowest priority (nice 19), so it
# takes the cycles classification leaves idle (domain rendering, θ0's two threads waiting on each
# other, the last NIPQ task) and finishes on its own after it; its log is printed at the end.
# Ctrl-C or a failure of classification stops it; the target fails if either failed.
# (tests/test_segmentation_demo.py runs DEMO_SEGMENTATION_ARGS as they are written here.)
DEMO_SEGMENTATION_ARGS = demo --task segmentation --size small --bits $(BITS) --out $(OUT)/segmentation

demo: $(STAMP)
	@mkdir -p $(OUT)/segmentation
	@echo "segmentation small case: running alongside at low priority (log: $(OUT)/segmentation.log)"
	@nice -n 19 $(VENV)/bin/hdrq $(DEMO_SEGMENTATION_ARGS) >$(OUT)/segmentation.log 2>&1 & seg=$$!; \
	trap 'kill $$seg 2>/dev/null; exit 130' INT TERM; \
	$(VENV)/bin/hdrq demo --bits $(BITS) --out $(OUT) || { kill $$seg 2>/dev/null; wait $$seg; exit 1; }; \
	wait $$seg; status=$$?; cat $(OUT)/segmentation.log; exit $$status

# the full segmentation setting (the trained U-Net zoo, 200 iterations per unit); not in `make demo`
demo-segmentation: $(STAMP)
	$(VENV)/bin/hdrq demo --task segmentation --bits $(BITS) --out runs/demo-segmentation

bench: $(STAMP)
	$(PY) -m benchmarks.mtda $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
