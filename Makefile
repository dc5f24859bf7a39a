# Two entry points on a fresh machine with only Python:
#   make demo   set up .venv, serve a local store, push the bundled MiniLM, pull it back
#   make test   set up .venv, lint, check generated stubs, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NATIVE := $(VENV)/.native

.PHONY: setup system-deps demo test test-numpy test-slow fuzz fuzz-native lint protos bench clean

setup: $(STAMP) $(NATIVE)

# torch is installed first, pinned to the CPU build that lies on these
# machines' disks; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The native codec core (mzstore/codecs/_native.c), rebuilt in place when its source changes.
# Optional: without a C compiler this warns and mzstore runs on its numpy codecs.
$(NATIVE): $(STAMP) mzstore/codecs/_native.c setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $(NATIVE)

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy mzstore
	$(VENV)/bin/lint-imports
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/limits_table.py --check

# System packages the tests use: nginx (the site cache in tests/test_nginx.py), from
# Debian's packages when missing. Without root or apt the tests that need it skip loudly.
system-deps:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx (Debian package) for the site-cache tests"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null 2>&1 || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }; }; \
	  else echo "WARNING: nginx is missing and cannot be installed here; tests/test_nginx.py will skip"; fi; }

test: setup system-deps lint
	$(PY) -m pytest -q -m "not slow"
	$(MAKE) --no-print-directory test-numpy

# The codec and pull tests once more on the numpy reference codecs (the native core turned off).
NUMPY_TESTS := tests/test_codecs.py tests/test_lossy_codecs.py tests/test_fuzz.py tests/test_native.py \
	tests/test_roundtrip.py tests/test_pipeline.py tests/test_keep_quantized.py tests/test_chunk_hash.py \
	tests/test_ecsq.py tests/test_lowrank.py
test-numpy: setup
	MZSTORE_NATIVE=0 $(PY) -m pytest -q -m "not slow" $(NUMPY_TESTS)

test-slow: setup
	$(PY) -m pytest -q -m slow

# The parser fuzz tests run bounded in `make test`; this runs them long (override MZSTORE_FUZZ_EXAMPLES).
fuzz: setup
	MZSTORE_FUZZ_EXAMPLES=$${MZSTORE_FUZZ_EXAMPLES:-20000} $(PY) -m pytest -q -m fuzz tests/test_fuzz.py

# Differential fuzzing of the native codec core against numpy (atheris): FUZZ_SECONDS (default 60) of
# coverage-guided libFuzzer growing build/fuzz-corpus, then every input of the corpus replayed with the
# core built under AddressSanitizer (build/asan; gcc's ASan runtime breaks atheris's coverage, so it
# checks the corpus rather than guiding the search).
FUZZ_SECONDS ?= 60
fuzz-native: setup
	$(PY) fuzz/fuzz_native.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=8192 build/fuzz-corpus
	rm -rf build/asan build/asan-tmp
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp
	MZSTORE_NATIVE_LIB=$$(ls build/asan/mzstore/codecs/_native*.so) LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 $(PY) fuzz/fuzz_native.py -runs=0 build/fuzz-corpus

protos: setup
	$(PY) scripts/gen_protos.py

bench: setup
	$(PY) bench/bench_lossless.py

clean:
	rm -rf $(VENV) demo-out
