"""Server assembly: create_server(config, address) -> (server, port), and serve()."""

from __future__ import annotations

import concurrent.futures
import hmac
import logging
import signal
import threading
import time

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import Config
from engine.errors import InvalidInput, Unavailable
from engine.pipeline import Engine

from .batcher import MicroBatcher
from .errors import abort
from .service import Servicer, end_if_gone
from .stubs import pb, rpc

log = logging.getLogger("rag.server")
SERVICES = ("CollectionService", "IngestService", "RetrieveService", "AnswerService", "InfoService")


class TokenAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token; send metadata 'authorization: Bearer <token>'")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_server_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming:
            return self._deny_stream
        if handler.response_streaming:
            return self._deny_server_stream
        return self._deny


class RequestGate(grpc.ServerInterceptor):
    """In front of every rag.v1 handler:
    - refuses a call whose deadline already passed (or that was cancelled), say while it
      waited for a worker thread, before any work: nothing is changed for a client that gave up.
      (A deadline that passes mid-work cannot undo the work; gRPC's DEADLINE_EXCEEDED allows that.)
    - parses the request bytes itself, so a malformed message (corrupt wire format, a string
      field that is not UTF-8) is INVALID_ARGUMENT naming the expected type. Left to grpc, a
      failing request deserializer ends the call as INTERNAL."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        parse = getattr(handler, "request_deserializer", None)
        cls = getattr(parse, "__self__", None)  # the message class of its FromString
        if not details.method.startswith("/rag.v1.") or not (isinstance(cls, type) and issubclass(cls, Message)):
            return handler
        name = cls.DESCRIPTOR.full_name

        def parsed(data):
            try:
                return parse(data)
            except DecodeError as e:
                reason = str(e).rpartition(": ")[2] or "malformed message"
                raise InvalidInput(f"the request could not be parsed as {name} ({reason}); send a serialized "
                                   f"{name}, with valid UTF-8 in its string fields") from None

        out = handler.response_serializer
        if handler.request_streaming:
            # Each message is parsed as the servicer reads it; its InvalidInput goes through
            # the servicer's own error mapping.
            def stream(request_iterator, context, inner=handler.stream_unary or handler.stream_stream):
                end_if_gone(context, "before the server started")
                return inner((parsed(b) for b in request_iterator), context)

            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(stream, response_serializer=out)
            return grpc.stream_unary_rpc_method_handler(stream, response_serializer=out)

        def unary(data, context, inner=handler.unary_unary or handler.unary_stream):
            end_if_gone(context, "before the server started")
            try:
                request = parsed(data)
            except InvalidInput as e:
                abort(context, e)
            return inner(request, context)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(unary, response_serializer=out)
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=out)


class Metrics:
    """Prometheus metrics, served on config.metrics_port when set."""

    def __init__(self, port: int | None, engine=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.requests = Counter("rag_requests_total", "RPCs by method and status code", ["method", "code"],
                                registry=self.registry)
        self.latency = Histogram("rag_request_seconds", "RPC latency", ["method"], registry=self.registry)
        self.ttft = Histogram("rag_time_to_first_token_seconds", "Answer: time to first token",
                              registry=self.registry)
        self.tokens = Counter("rag_generated_tokens_total", "tokens generated", registry=self.registry)
        # vLLM's time_per_output_token: a stream's speed as its client sees it, per answer
        self.tpot = Histogram("rag_time_per_output_token_seconds",
                              "Answer: decode time per token after each generation's first",
                              buckets=(0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
                              registry=self.registry)
        self.batch = Histogram("rag_microbatch_size", "requests per micro-batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue = Gauge("rag_generation_queue_depth", "answers waiting for a row in the scheduler's batch",
                           registry=self.registry)
        self.running = Gauge("rag_generations_running", "answers in the scheduler's batch (prefilling or decoding)",
                             registry=self.registry)
        if engine is not None:
            self.watch(engine)
        self.port = None
        self._http = None
        if port is not None:
            server, _ = start_http_server(port, registry=self.registry)
            self.port = server.server_port
            self._http = server

    def close(self) -> None:
        """Stop serving /metrics and free its port."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def answered(self, a) -> None:
        """Count a finished Answer's tokens and its time per output token (its decode time over
        the tokens after each generation's first: a retried degenerate answer has two firsts)."""
        self.tokens.inc(a.completion_tokens)
        after_first = a.completion_tokens - (a.retries + 1)
        if after_first > 0 and a.timings_ns.get("decode", 0) > 0:
            self.tpot.observe(a.timings_ns["decode"] / 1e9 / after_first)

    def watch(self, engine) -> None:
        """Read the scheduler's rows at scrape time, so a leaked row shows as a stuck gauge,
        and where its loop's time went (DecoderCollector)."""
        self.queue.set_function(lambda: engine.generation_load()[1])
        self.running.set_function(lambda: engine.generation_load()[0])
        self.registry.register(DecoderCollector(engine))


class DecoderCollector:
    """The generation loop's usage (Engine.generation_usage) as counters, read at scrape
    time: rag_decoder_seconds_total and rag_decoder_runs_total by run kind (prefill, step,
    verify), rag_prompt_tokens_total by how a prompt token's keys came (prefilled, riding,
    cached). E.g. the share of the loop's time in prefill runs is
    rate(rag_decoder_seconds_total{run="prefill"}[1m])."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        u = self.engine.generation_usage()
        seconds = CounterMetricFamily("rag_decoder_seconds", "seconds the generation loop spent in runs, by kind",
                                      labels=["run"])
        runs = CounterMetricFamily("rag_decoder_runs", "runs of the generation loop, by kind", labels=["run"])
        for kind in u["seconds"]:
            seconds.add_metric([kind], u["seconds"][kind])
            runs.add_metric([kind], u["runs"][kind])
        tokens = CounterMetricFamily("rag_prompt_tokens", "prompt tokens by how their keys came: a prefill run "
                                     "of their own, riding in a verify run, or the prefix cache", labels=["source"])
        for source, n in u["prompt_tokens"].items():
            tokens.add_metric([source], n)
        yield from (seconds, runs, tokens)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it to its end: unary
    calls when they return, streaming ones when their last message is sent (or the call
    fails or is cancelled)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def _record(self, method: str, context, t0: float, error: BaseException | None) -> None:
        if error is None:
            code = context.code() or grpc.StatusCode.OK
        elif isinstance(error, GeneratorExit):  # the client went away mid-stream
            code = grpc.StatusCode.CANCELLED
        else:
            code = context.code() or grpc.StatusCode.UNKNOWN
        self.m.requests.labels(method, getattr(code, "name", str(code))).inc()
        self.m.latency.labels(method).observe(time.perf_counter() - t0)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        record = self._record

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            def streaming(request, context):
                t0 = time.perf_counter()
                try:
                    yield from inner(request, context)
                except BaseException as e:
                    record(method, context, t0, e)
                    raise
                record(method, context, t0, None)

            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
            return make(streaming, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)

        inner = handler.stream_unary or handler.unary_unary

        def unary(request, context):
            t0 = time.perf_counter()
            try:
                out = inner(request, context)
            except BaseException as e:
                record(method, context, t0, e)
                raise
            record(method, context, t0, None)
            return out

        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(unary, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class RagServer:
    """The running pieces, so shutdown can stop them in order."""

    def __init__(self, grpc_server, engine, batcher, health_servicer, metrics, servicer) -> None:
        self.grpc = grpc_server
        self.engine = engine
        self.batcher = batcher
        self.health = health_servicer
        self.metrics = metrics
        self.servicer = servicer
        # Snapshots also run on a timer, so a server whose writes stop does not keep a long
        # write-ahead log to replay at its next start.
        self._stopping = threading.Event()
        self._snapshots = threading.Thread(target=self._snapshot_loop, name="rag-snapshots", daemon=True)
        self._snapshots.start()

    def _snapshot_loop(self) -> None:
        interval = self.engine.config.snapshot_interval_s
        while interval > 0 and not self._stopping.wait(interval):
            try:
                self.engine.save()
            except Exception:  # noqa: BLE001 - the log still holds every write; try again later
                log.exception("periodic snapshot failed")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish up to `grace` seconds, snapshot."""
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.engine.config.grace_s if grace is None else grace).wait()
        self._stopping.set()
        self._snapshots.join(timeout=60)
        self.batcher.close()
        self.metrics.close()
        self.engine.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


def create_server(config: Config, address: str, *, engine: Engine | None = None):
    """A started server bound to `address` (port 0 picks one) -> (RagServer, port)."""
    engine = engine or Engine(config)
    engine.warmup()
    if config.warm_generator:
        try:  # load and warm the generator now, so the first Answer does not pay for it
            engine.generator.warmup()
            engine.scheduler.wait_started()  # start the generation loop (and its calibration) now
        except Unavailable as e:
            log.warning("generation disabled until the model is built: %s", e)
    metrics = Metrics(config.metrics_port)
    batcher = MicroBatcher(engine, window_ms=config.batch_window_ms)
    batcher.on_batch = metrics.batch.observe
    servicer = Servicer(engine, batcher, metrics)
    metrics.watch(engine)
    interceptors = [MetricsInterceptor(metrics), RequestGate()]
    if config.auth_token:
        interceptors.insert(0, TokenAuth(config.auth_token))
    # A Search/Embed call holds its thread while it waits for its micro-batch, so the pool
    # must cover the concurrency we want to batch (grpc_load: 128 clients were refused
    # with RESOURCE_EXHAUSTED when the pool and RPC limit were 42 and 106).
    workers = config.max_concurrent_generations + config.max_queued_generations + 160
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rag-rpc"),
                         interceptors=interceptors, options=options,
                         maximum_concurrent_rpcs=2 * workers)
    rpc.add_CollectionServiceServicer_to_server(servicer, server)
    rpc.add_IngestServiceServicer_to_server(servicer, server)
    rpc.add_RetrieveServiceServicer_to_server(servicer, server)
    rpc.add_AnswerServiceServicer_to_server(servicer, server)
    rpc.add_InfoServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if config.tls_cert:
        key = config.tls_key.read_bytes()
        cert = config.tls_cert.read_bytes()
        ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    # A second writer of one of our collections is told to come through this address.
    engine.collections.owner = {"command": "rag serve", "address": f"{address.rpartition(':')[0]}:{port}"}
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RagServer(server, engine, batcher, health_servicer, metrics, servicer), port


def serve(config: Config, address: str) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    srv, port = create_server(config, address)
    log.info("serving rag.v1 on %s (port %d)%s%s", address, port, " with TLS" if config.tls_cert else "",
             f"; metrics on :{srv.metrics.port}" if srv.metrics.port else "")
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down (grace %.0fs)", signum, config.grace_s)
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    done.wait()
    srv.stop()
    log.info("stopped")
