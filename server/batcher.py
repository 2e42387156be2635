"""Micro-batching of concurrent single Search and Embed calls.

Each usearch search and each ONNX run holds the GIL or the cores for its whole call, so
many small concurrent calls are slower than one batched call. Requests that arrive within
`window_ms` of the first one in an empty queue are answered together: one embedding batch
for all their texts, then one index batch search per collection, through the same
engine search (engine/search.py) that every other caller uses.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time

import numpy as np


class MicroBatcher:
    def __init__(self, engine, *, window_ms: float, max_batch: int = 256) -> None:
        self.engine = engine
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self.batch_sizes: collections.Counter = collections.Counter()
        self.on_batch = None  # metrics hook: callable(size)
        self._thread = threading.Thread(target=self._loop, name="rag-microbatcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _submit(self, item) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("server is shutting down")
            self._queue.append((item, fut, time.perf_counter_ns()))
            self._cv.notify()
        return fut

    def search(self, collection: str, query: str, k: int, filter: dict | None, mode: str | None = None):
        """(hits, queue_ns, embed_ns, search_ns) for one query, batched with its neighbours."""
        self.engine.check_query(query)
        k = self.engine.check_k(k)
        mode = self.engine.check_mode(mode)
        return self._submit(("search", collection, query, k, filter, mode)).result()

    def embed(self, texts: list[str]):
        """(vectors, queue_ns, embed_ns) for a list of texts, batched with its neighbours."""
        self.engine.embedder.check_texts(texts)
        return self._submit(("embed", texts)).result()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                deadline = time.perf_counter() + self.window
                while len(self._queue) < self.max_batch and not self._stop:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
            self._run(batch)

    def _run(self, batch) -> None:
        start = time.perf_counter_ns()
        self.batch_sizes[len(batch)] += 1
        if self.on_batch:
            self.on_batch(len(batch))
        texts, owners = [], []
        for i, (item, fut, _) in enumerate(batch):
            if not fut.set_running_or_notify_cancel():
                continue
            if item[0] == "search":
                texts.append(item[2])
                owners.append((i, None))
            else:
                for j, t in enumerate(item[1]):
                    texts.append(t)
                    owners.append((i, j))
        if not texts:
            return
        try:
            vectors = self.engine.embedder.embed(texts)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about it
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        t_embed = time.perf_counter_ns()
        embed_ns = t_embed - start
        rows: dict[int, list[int]] = collections.defaultdict(list)
        for row, (i, _) in enumerate(owners):
            rows[i].append(row)
        # group searches by (collection, filter) for one index batch search each
        groups: dict = collections.defaultdict(list)
        for i, (item, fut, _) in enumerate(batch):
            if fut.done() or i not in rows:
                continue
            if item[0] == "embed":
                fut.set_result((vectors[rows[i]], start - batch[i][2], embed_ns))
            else:
                key = (item[1], json.dumps(item[4] or {}, sort_keys=True), item[5])  # filters hold lists
                groups[key].append(i)
        for (collection, filt, mode), members in groups.items():
            k = max(batch[i][0][3] for i in members)
            t0 = time.perf_counter_ns()
            try:
                q = np.stack([vectors[rows[i][0]] for i in members])
                results = self.engine.searcher.search(collection, [batch[i][0][2] for i in members], k,
                                                      filter=json.loads(filt) or None, mode=mode, vectors=q).hits
            except BaseException as e:  # noqa: BLE001
                for i in members:
                    batch[i][1].set_exception(e)
                continue
            search_ns = time.perf_counter_ns() - t0
            for i, hits in zip(members, results):
                item, fut, queued = batch[i]
                fut.set_result((hits[:item[3]], start - queued, embed_ns, search_ns))
