"""One frozen configuration object for the whole engine.

Defaults are module-level constants so callers and docs can name them. Environment
variables are read only by the CLI (engine/cli.py), never at import time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import InvalidInput
from .export_lm import VERIFY_MAX_TOKENS

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_DATA_DIR = Path("data")
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_VARIANTS = ("fp32", "int8")
DEFAULT_EMBED_VARIANT = "int8"
PROVIDERS = ("cpu", "cuda")
DEFAULT_PROVIDER = "cpu"
# Padded tokens per ONNX batch: large enough to amortise per-call overhead, small enough
# that activations (batch x len x hidden x layers) stay in cache-friendly sizes.
DEFAULT_BATCH_MAX_TOKENS = 4096
DEFAULT_MAX_BATCH = 128

DEFAULT_CHUNK_TOKENS = 256
DEFAULT_CHUNK_OVERLAP = 32

INDEX_DTYPES = ("f32", "f16", "i8")
# i8 + exact f32 re-scoring: same retrieval quality as f32 on SQuAD (R@5 0.8652 vs 0.8651),
# a 4x smaller graph, and the fastest of our dtypes at recall@10 >= 0.99 (benchmarks/ann.py).
DEFAULT_INDEX_DTYPE = "i8"
DEFAULT_CONNECTIVITY = 16
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 64
# Quantized indexes fetch this many times k candidates and rescore them exactly in f32.
DEFAULT_OVERSAMPLE = 4
MAX_TOP_K = 1000
MAX_LIST_PAGE = 1000  # documents in one page of a listing (Engine.list_documents, ListDocuments)
MAX_GET_DOCUMENTS = 1000  # ids in one Engine.get_documents / GetDocuments call

DEFAULT_GEN_MODEL = "qwen2.5-coder-0.5b-instruct"
# The generator's weights: fp32, weight-only int8 and int4 copies, and w8a8 (8-bit weights
# and activations, integer products; engine/export_lm.py).
GEN_WEIGHTS = ("fp32", "int8", "int4", "w8a8")
# Which weights decode and which prefill: "auto" follows the machine's plan (engine/plan.py:
# measured by `make models` per CPU, else chosen by CPU features), or a name to force one.
# Decode reads every weight once per token, so fewer bytes win; prefill is arithmetic-bound,
# and on CPUs without 8-bit dot-product instructions fp32 prefills fastest.
GEN_VARIANTS = ("auto", *GEN_WEIGHTS)
DEFAULT_GEN_VARIANT = "auto"
GEN_PREFILL_VARIANTS = GEN_VARIANTS
DEFAULT_GEN_PREFILL_VARIANT = "auto"
# And which run speculative decoding's verify runs (a row's last token and its drafts at once).
DEFAULT_GEN_VERIFY_VARIANT = "auto"
# What an "auto" decode is fastest at: "latency", one row alone (a lone stream's tokens/s);
# "throughput", a full batch (a busy server's aggregate tokens/s). The plan measures both
# (engine/plan.py); they differ where a variant's kernels batch badly (int4 on the AMX Xeon).
PLAN_OBJECTIVES = ("latency", "throughput")
DEFAULT_PLAN_OBJECTIVE = "latency"
# Prompt + answer tokens. The model takes 32k, but prefill cost grows with it on a CPU;
# 2048 holds ~6 chunks of 256 embedding tokens plus a 256-token answer.
DEFAULT_CONTEXT_WINDOW = 2048
DEFAULT_MAX_NEW_TOKENS = 256
# Chunks retrieved for an answer; as many as fit in the window are packed into the prompt.
DEFAULT_ANSWER_K = 3
# Context packing (engine/support.py Supporter.pack): with a budget, the prompt gets the
# retrieved chunks' sentences closest to the question, each with this many neighbours
# either side, up to this many tokens of passage text, instead of whole chunks. 0 or None: off.
# SQuAD dev, 200 questions (answer_quality.py --packing): whole chunks, k 5: gold answer in
# the prompt 0.930 at a median 889 prompt tokens; k 2: 0.890 at 401; k 3 with a 350-token
# budget: 0.890 / 0.895 / 0.905 at 441 / 424 / 416 with 0 / 1 / 2 neighbours.
# Default: k 3, 350 tokens, 2 neighbours, the best of 12 settings at <= 450 median prompt
# tokens (k 3-5 x 350/400 x 1/2 neighbours: 0.870-0.910, the 0.910 at 472 tokens), 2.5 points
# under whole chunks at k 5 at 47% of the prompt; answers: README "Checked answers".
DEFAULT_CONTEXT_BUDGET_TOKENS = 350
DEFAULT_CONTEXT_NEIGHBOURS = 2
# Chosen among eight templates on the sample corpus with the 0.5B int8 model (answered 8 of 8
# answerable questions, vs 5-6 for the others): the rule, with the refusal sentence verbatim,
# in the system message; passages, question and a request to cite in the user message.
NO_ANSWER = "The context does not contain the answer."
DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Answer using only the passages the user gives you. "
                         f"When the passages do not contain the answer, reply: {NO_ANSWER}")
# The user message: chosen on 200 SQuAD dev questions (benchmarks/answer_quality.py --prompts,
# k 3, 350-token packing) over "Answer briefly and cite ..." (contains-gold 0.47, F1 19.3,
# cited 0.17, degenerate at the first try 0.09) and the question before the passages (0.39,
# 14.1, 0.72, 0.78): contains-gold 0.52, F1 20.2, cited 0.40, degenerate first 0.03.
DEFAULT_PROMPT_TEMPLATE = ("{context}\nQuestion: {question}\nAnswer in one sentence in the passage's own words and "
                           "cite the passage numbers like [1].")
# An answer that is empty, only citations, or a passage's header (engine/support.py) is
# generated once more with this line after the user message (the passages stay first, so
# the prefix cache serves their KV), else the best-matching source sentence is returned,
# marked as extracted.
DEFAULT_RETRY_INSTRUCTION = ("Reply with the words from the passage that answer the question, in one short "
                             "sentence, then the passage number like [1]. Never reply with only a number.")
# An answer sentence is supported when its best source sentence reaches this cosine
# similarity (MiniLM scale) or holds this share of its content words.
DEFAULT_SUPPORT_MIN_SCORE = 0.6
DEFAULT_SUPPORT_MIN_OVERLAP = 0.5
# Chunks scoring below this cosine similarity (MiniLM scale), or below this share of the
# best chunk's score, are not put in the prompt. If none is left, the answer is NO_ANSWER
# without running the generator: a small model given unrelated passages answers from
# memory instead of declining. 0 turns the gate off.
DEFAULT_ANSWER_MIN_SCORE = 0.2
DEFAULT_ANSWER_MIN_RELATIVE = 0.5

# Search: "hybrid" fuses the dense (HNSW) ranking with a BM25 ranking (SQLite FTS5),
# taking HYBRID_DEPTH candidates from each; "dense" is HNSW only; "exact" scores every stored
# vector (no index: exact recall, cost growing with the collection). On SQuAD v1.1 dev, hybrid
# recall@5 is well above either alone (benchmarks/retrieval_quality.py).
SEARCH_MODES = ("hybrid", "dense", "exact")
DEFAULT_SEARCH_MODE = "hybrid"
DEFAULT_HYBRID_DEPTH = 30
# How the two rankings are fused (engine/kernels.py fuse):
#   "convex": alpha * dense + (1 - alpha) * bm25, each min-max normalised over the
#             candidates (Bruch et al. 2023); a clear semantic winner stays first. On SQuAD
#             dev (10,565 questions, i8 index) alpha 0.5 gives R@1 0.810 / R@5 0.955 /
#             nDCG@10 0.898 against RRF's 0.731 / 0.937 / 0.857; alpha 0.4 ties it (within
#             0.0013 everywhere) and SQuAD's questions share their paragraph's rare words,
#             which favours BM25, so the even weight is the default.
#   "rrf": reciprocal rank fusion, sum of 1 / (rrf_k + rank) (Cormack et al. 2009).
#   "weighted_rrf": alpha / (rrf_k + dense rank) + (1 - alpha) / (rrf_k + bm25 rank).
FUSIONS = ("convex", "rrf", "weighted_rrf")
DEFAULT_FUSION = "convex"
DEFAULT_FUSION_ALPHA = 0.5
DEFAULT_RRF_K = 60.0

# Durability (engine/wal.py): when the write-ahead log is synced before a write is
# acknowledged ("batch": every commit; "interval": at most every WAL_FSYNC_INTERVAL_MS;
# "off": left to the OS), and when a snapshot (store + index synced, log emptied) is taken.
WAL_FSYNC_POLICIES = ("batch", "interval", "off")
DEFAULT_WAL_FSYNC = "batch"
DEFAULT_WAL_FSYNC_INTERVAL_MS = 100.0
DEFAULT_SNAPSHOT_WAL_BYTES = 64 * 1024 * 1024
DEFAULT_SNAPSHOT_INTERVAL_S = 300.0

# Generation scheduler (engine/scheduler.py): one loop owns the decoder; at most
# MAX_CONCURRENT_GENERATIONS rows decode together (one batched step for all of them) and
# MAX_QUEUED_GENERATIONS more wait, beyond that Overloaded. The rows' KV cache may take
# KV_BUDGET_TOKENS token slots (rows x the longest row's prompt + max_new_tokens; ~24 KB a
# token for the 0.5B model, so 16384 is ~400 MB). A newcomer is prefilled in chunks between
# decode steps: while rows decode, each chunk is sized to stall them about PREFILL_STALL_MS
# at most (their inter-token latency while someone joins; a chunk riding in a verify run
# makes that run no longer; smaller for steadier streams, larger for prompt throughput:
# see README, Serving answers); with nobody decoding, PREFILL_CHUNK
# tokens at once. Full blocks of PREFIX_BLOCK_TOKENS prompt tokens are kept in a prefix KV
# cache of PREFIX_CACHE_MB (0: off) and reused by prompts that start the same.
DEFAULT_MAX_CONCURRENT_GENERATIONS = 8
DEFAULT_MAX_QUEUED_GENERATIONS = 64
DEFAULT_KV_BUDGET_TOKENS = 16384
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_PREFILL_STALL_MS = 500.0
DEFAULT_PREFIX_BLOCK_TOKENS = 16
DEFAULT_PREFIX_CACHE_MB = 256.0
# Speculative decoding (engine/scheduler.py): a greedy answer drafts up to this many
# tokens per run from its own prompt and checks them in one run of the model. None: the
# count the machine's plan measured best (engine/plan.py draft_choice: 3 or 7; 3 where
# nothing is measured); under the throughput objective 0 (off: rows share one-token steps
# instead) unless full verify runs make more tokens/s than full one-token batches here
# (plan.drafts_pay_in_full_runs). At most what one verify run carries after the last token.
DEFAULT_SPECULATIVE_TOKENS = None
SPECULATIVE_TOKENS_LATENCY = 3
MAX_SPECULATIVE_TOKENS = VERIFY_MAX_TOKENS - 1


def check_speculative_tokens(value) -> None:
    """Config.speculative_tokens and SamplingParams.speculative_tokens: None, or 0 (off) to
    MAX_SPECULATIVE_TOKENS."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= MAX_SPECULATIVE_TOKENS):
        raise InvalidInput(f"speculative_tokens must be an integer in [0, {MAX_SPECULATIVE_TOKENS}] (0 = off), "
                           f"got {value!r}")

# Server (server/): limits and the micro-batching window.
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_BATCH_WINDOW_MS = 2.0
DEFAULT_MAX_BATCH_REQUEST = 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# One document's text or file bytes sent to the server. Below the message limit, with room
# for the rest of the message, so an oversized document gets a clear per-document error
# naming this limit rather than gRPC's generic "message larger than max".
DEFAULT_MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
MESSAGE_HEADROOM_BYTES = 1024 * 1024
DEFAULT_GRACE_S = 10.0


def default_threads() -> int:
    """Threads for onnxruntime: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Engine settings. Construct with keywords; every field has a documented default."""

    data_dir: Path = DEFAULT_DATA_DIR
    # Open collections only as readers: never take a writer lock, refuse every write
    # (`rag search`, `rag serve --read-only`; engine/collection.py).
    read_only: bool = False
    models_dir: Path = DEFAULT_MODELS_DIR
    embed_model: str = DEFAULT_EMBED_MODEL
    embed_variant: str = DEFAULT_EMBED_VARIANT
    provider: str = DEFAULT_PROVIDER
    threads: int = dataclasses.field(default_factory=default_threads)
    # The generator's sessions (prefill, decode, verify, row slots: a busy scheduler switches
    # between them every step) stop their idle threads spinning when a run returns
    # (onnxruntime's session.force_spinning_stop). Spinning on, the session that just ran
    # keeps a core busy while the next one runs: on 2 cores an 80-token prefill chunk right
    # after another session's verify run took ~25% longer than after one of its own (153-160
    # ms against 123-128), and a verify run of 8 rows after a prefill 118-145 ms against 82-112
    # stopped (AVX-512 VNNI EPYC, ad-hoc); benchmarks/serve_answers.py --systems
    # ours,spinning measures the server both ways. False: they spin on, as before.
    stop_spinning: bool = True
    batch_max_tokens: int = DEFAULT_BATCH_MAX_TOKENS
    max_batch: int = DEFAULT_MAX_BATCH
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    index_dtype: str = DEFAULT_INDEX_DTYPE
    connectivity: int = DEFAULT_CONNECTIVITY
    expansion_add: int = DEFAULT_EXPANSION_ADD
    expansion_search: int = DEFAULT_EXPANSION_SEARCH
    oversample: int = DEFAULT_OVERSAMPLE
    search_mode: str = DEFAULT_SEARCH_MODE
    hybrid_depth: int = DEFAULT_HYBRID_DEPTH
    fusion: str = DEFAULT_FUSION
    fusion_alpha: float = DEFAULT_FUSION_ALPHA
    rrf_k: float = DEFAULT_RRF_K
    wal_fsync: str = DEFAULT_WAL_FSYNC
    wal_fsync_interval_ms: float = DEFAULT_WAL_FSYNC_INTERVAL_MS
    snapshot_wal_bytes: int = DEFAULT_SNAPSHOT_WAL_BYTES
    snapshot_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S
    gen_model: str = DEFAULT_GEN_MODEL
    gen_variant: str = DEFAULT_GEN_VARIANT
    gen_prefill_variant: str = DEFAULT_GEN_PREFILL_VARIANT
    gen_verify_variant: str = DEFAULT_GEN_VERIFY_VARIANT
    plan_objective: str = DEFAULT_PLAN_OBJECTIVE
    context_window: int = DEFAULT_CONTEXT_WINDOW
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    answer_k: int = DEFAULT_ANSWER_K
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    answer_min_score: float = DEFAULT_ANSWER_MIN_SCORE
    answer_min_relative: float = DEFAULT_ANSWER_MIN_RELATIVE
    retry_instruction: str = DEFAULT_RETRY_INSTRUCTION
    context_budget_tokens: int | None = DEFAULT_CONTEXT_BUDGET_TOKENS
    context_neighbours: int = DEFAULT_CONTEXT_NEIGHBOURS
    support_min_score: float = DEFAULT_SUPPORT_MIN_SCORE
    support_min_overlap: float = DEFAULT_SUPPORT_MIN_OVERLAP
    # --- server
    max_concurrent_generations: int = DEFAULT_MAX_CONCURRENT_GENERATIONS
    max_queued_generations: int = DEFAULT_MAX_QUEUED_GENERATIONS
    kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefill_stall_ms: float = DEFAULT_PREFILL_STALL_MS
    prefix_block_tokens: int = DEFAULT_PREFIX_BLOCK_TOKENS
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB
    speculative_tokens: int | None = DEFAULT_SPECULATIVE_TOKENS
    # A speculating answer drafts as many tokens as its own agreement rates make worth their
    # place in the run (engine/scheduler.DRAFT_WORTH), up to speculative_tokens; False: always
    # up to speculative_tokens. The tokens are the same either way.
    adaptive_drafts: bool = True
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    max_batch_request: int = DEFAULT_MAX_BATCH_REQUEST
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    grace_s: float = DEFAULT_GRACE_S
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int | None = None
    warm_generator: bool = True  # load the generator at server start (False: on first Answer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        if self.embed_variant not in EMBED_VARIANTS:
            raise InvalidInput(f"embed_variant must be one of {EMBED_VARIANTS}, got {self.embed_variant!r}")
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.index_dtype not in INDEX_DTYPES:
            raise InvalidInput(f"index dtype must be one of {INDEX_DTYPES}, got {self.index_dtype!r}")
        if self.search_mode not in SEARCH_MODES:
            raise InvalidInput(f"search_mode must be one of {SEARCH_MODES}, got {self.search_mode!r}")
        if self.fusion not in FUSIONS:
            raise InvalidInput(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not 0.0 <= self.fusion_alpha <= 1.0:
            raise InvalidInput(f"fusion_alpha must be in [0, 1], got {self.fusion_alpha}")
        if self.rrf_k <= 0:
            raise InvalidInput(f"rrf_k must be > 0, got {self.rrf_k}")
        if self.wal_fsync not in WAL_FSYNC_POLICIES:
            raise InvalidInput(f"wal_fsync must be one of {WAL_FSYNC_POLICIES}, got {self.wal_fsync!r}")
        if self.wal_fsync_interval_ms < 0 or self.snapshot_interval_s < 0 or self.snapshot_wal_bytes < 1:
            raise InvalidInput("wal_fsync_interval_ms and snapshot_interval_s must be >= 0, snapshot_wal_bytes >= 1")
        if self.max_queued_generations < 0 or self.batch_window_ms < 0 or self.grace_s < 0:
            raise InvalidInput("max_queued_generations, batch_window_ms and grace_s must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("TLS needs both a certificate and a key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInput("a client CA (mTLS) needs the server certificate and key too")
        if self.gen_variant not in GEN_VARIANTS:
            raise InvalidInput(f"gen_variant must be one of {GEN_VARIANTS}, got {self.gen_variant!r}")
        if self.gen_prefill_variant not in GEN_PREFILL_VARIANTS:
            raise InvalidInput(f"gen_prefill_variant must be one of {GEN_PREFILL_VARIANTS}, "
                               f"got {self.gen_prefill_variant!r}")
        if self.gen_verify_variant not in GEN_VARIANTS:
            raise InvalidInput(f"gen_verify_variant must be one of {GEN_VARIANTS}, got {self.gen_verify_variant!r}")
        if self.plan_objective not in PLAN_OBJECTIVES:
            raise InvalidInput(f"plan_objective must be one of {PLAN_OBJECTIVES}, got {self.plan_objective!r}")
        if self.context_budget_tokens is not None and (
                isinstance(self.context_budget_tokens, bool) or not isinstance(self.context_budget_tokens, int)
                or 0 < self.context_budget_tokens < 16 or self.context_budget_tokens < 0):
            raise InvalidInput(f"context_budget_tokens must be an integer >= 16, or 0 or None (off: whole chunks), "
                               f"got {self.context_budget_tokens!r}")
        if isinstance(self.context_neighbours, bool) or not isinstance(self.context_neighbours, int) \
                or not 0 <= self.context_neighbours <= 8:
            raise InvalidInput(f"context_neighbours must be an integer in [0, 8], got {self.context_neighbours!r}")
        if not (0.0 <= self.support_min_score <= 1.0 and 0.0 <= self.support_min_overlap <= 1.0):
            raise InvalidInput("support_min_score and support_min_overlap must be in [0, 1]")
        if "{context}" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise InvalidInput("prompt_template must contain {context} and {question}")
        for name in ("threads", "batch_max_tokens", "max_batch", "chunk_tokens", "connectivity",
                     "expansion_add", "expansion_search", "oversample", "hybrid_depth", "context_window",
                     "max_new_tokens", "answer_k", "max_concurrent_generations", "max_batch_request",
                     "kv_budget_tokens", "prefill_chunk", "prefix_block_tokens",
                     "max_message_bytes", "max_document_bytes"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk % self.prefix_block_tokens:
            raise InvalidInput(f"prefill_chunk ({self.prefill_chunk}) must be a multiple of prefix_block_tokens "
                               f"({self.prefix_block_tokens})")
        if self.prefill_stall_ms <= 0:
            raise InvalidInput(f"prefill_stall_ms must be > 0, got {self.prefill_stall_ms}")
        check_speculative_tokens(self.speculative_tokens)
        if self.prefix_cache_mb < 0:
            raise InvalidInput(f"prefix_cache_mb must be >= 0 (0 = off), got {self.prefix_cache_mb}")
        if self.max_document_bytes + MESSAGE_HEADROOM_BYTES > self.max_message_bytes:
            raise InvalidInput(f"max_message_bytes ({self.max_message_bytes}) must exceed max_document_bytes "
                               f"({self.max_document_bytes}) by at least {MESSAGE_HEADROOM_BYTES}, so a message "
                               "holding the largest allowed document is still received")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise InvalidInput(
                f"chunk_overlap must be in [0, chunk_tokens={self.chunk_tokens}), got {self.chunk_overlap}")

    @property
    def embed_model_dir(self) -> Path:
        """Folder holding the exported ONNX embedding model (made by `make models`)."""
        return self.models_dir / self.embed_model

    @property
    def gen_model_dir(self) -> Path:
        """Folder holding the exported ONNX generation model (made by `make models`)."""
        return self.models_dir / self.gen_model

    @property
    def draft_tokens(self) -> int:
        """speculative_tokens, resolved (None: the machine's plan's count for plan_objective,
        engine/plan.resolve)."""
        if self.speculative_tokens is not None:
            return self.speculative_tokens
        if not (self.gen_model_dir / "manifest.json").exists():  # no model yet: nothing measured
            return SPECULATIVE_TOKENS_LATENCY if self.plan_objective == "latency" else 0
        from .plan import for_config

        return for_config(self).drafts

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
