"""OpenTelemetry tracing, configured only by OpenTelemetry's own environment variables.

Off unless an exporter is configured: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, or any
exporter installed under the SDK's entry points; ``none`` = off), or, without it, an OTLP
endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: a
collector named means "send there"). ``OTEL_SDK_DISABLED=true`` wins. Off, nothing here runs
per request but one attribute check, and the SDK is never imported: it and the exporters are
the optional ``trace`` extra. The exporter reads its own variables (endpoint, headers, timeout,
compression), the provider the sampler (``OTEL_TRACES_SAMPLER``, ``..._ARG``), the resource
(``OTEL_SERVICE_NAME``, default ``imgrec``; ``OTEL_RESOURCE_ATTRIBUTES``), the batch processor
``OTEL_BSP_*``, the propagators ``OTEL_PROPAGATORS`` (W3C ``traceparent`` by default).
``OTEL_EXPORTER_OTLP_PROTOCOL`` is ``http/protobuf`` (the specification's default) or
``grpc``.

The spans of one request: a server span (the skins start it), under it ``read upload``,
``decode`` per image, ``queue wait``, ``forward`` per batch its images ran in, ``store write``,
``search``. A batch serves many requests, so it is a trace of its own: a ``batch`` span linked
to the server span of every request it served, and each request's ``forward`` span is linked
back to it. Spans of the batch's steps are made on the request's side from times the inference
and finish threads record, so those threads never touch a request's span.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app import __version__
from app.serving.request_context import CURRENT

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger("imgrec.tracing")
TRACE_EXTRA = "pip install 'imgrec[trace]'"
_NULL: AbstractContextManager[None] = nullcontext()


class TracingError(ValueError):
    """The OTEL_* variables ask for something this process cannot do (one line, naming it)."""


@dataclass(slots=True)
class BatchTrace:
    """One forward pass as its requests' spans need it: the batch span, the pass's times and
    its store write's (epoch ns, set by the inference and finish threads)."""

    context: SpanContext
    size: int
    start_ns: int
    end_ns: int = 0
    store_start_ns: int = 0
    store_end_ns: int = 0
    stored: bool = False


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER")
    if named is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in named.split(",") if n.strip()]
    return [] if "none" in names else names


def protocol(env: Mapping[str, str]) -> str:
    value = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
             or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if value not in ("http/protobuf", "grpc"):
        raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r}: imgrec sends traces over "
                           "'http/protobuf' or 'grpc'")
    return value


def check_env(env: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables name ([] = tracing off), once this process can run
    them; TracingError naming the variable otherwise. Builds nothing."""
    names = _exporter_names(env)
    if not names:
        return []
    protocol(env)
    missing = [m for m in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http",
                           "opentelemetry.exporter.otlp.proto.grpc") if not _importable(m)]
    if missing:
        raise TracingError(f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK "
                           f"and its exporters ({', '.join(missing)} missing): {TRACE_EXTRA}")
    from importlib.metadata import entry_points

    for name in names:
        if name != "otlp" and not entry_points(group="opentelemetry_traces_exporter", name=name):
            raise TracingError(f"OTEL_TRACES_EXPORTER={name!r}: no such trace exporter "
                               "installed (imgrec knows otlp, console and none)")
    return names


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "otlp":
        if protocol(env) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from importlib.metadata import entry_points

    (found,) = entry_points(group="opentelemetry_traces_exporter", name=name)
    exporter: SpanExporter = found.load()()
    return exporter


def _provider(names: Sequence[str], env: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "imgrec"}))
    if "service.version" not in resource.attributes:
        resource = resource.merge(Resource({"service.version": __version__}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


def describe(env: Mapping[str, str]) -> str:
    """The tracing set-up in one line for the start-up log: never the exporter's headers (they
    carry collectors' API keys), and an endpoint without its user and password."""
    names = _exporter_names(env)
    if not names:
        return "tracing off (no OTEL_TRACES_EXPORTER or OTLP endpoint)"
    parts = []
    for name in names:
        if name == "otlp":
            endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the default endpoint")
            url = urlsplit(endpoint)
            shown = url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "")
                                 ).geturl() if url.hostname else endpoint
            parts.append(f"otlp ({protocol(env)}) to {shown}")
        else:
            parts.append(name)
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    return f"tracing on: {', '.join(parts)}; sampler {sampler}"


class Tracing:
    """The app's tracer, or nothing (``on`` is False: every method is then a no-op)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.on = provider is not None
        self.tracer: Tracer | None = (provider.get_tracer("imgrec", __version__)
                                      if provider is not None else None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tracing:
        """As the OTEL_* variables say (off without an exporter); TracingError when they ask
        for what cannot be done (an unknown exporter or protocol, the SDK not installed)."""
        env = os.environ if env is None else env
        names = check_env(env)
        return cls(_provider(names, env)) if names else cls()

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporters' threads."""
        if self.provider is not None:
            self.provider.shutdown()

    def force_flush(self, timeout_ms: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_ms) if self.provider is not None else True

    # -- a request's spans ---------------------------------------------------------------------
    def server_span(self, name: str, carrier: Mapping[str, str],
                    attributes: dict[str, Any]) -> Span:
        """A request's server span, continuing the trace the carrier's ``traceparent`` names."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        assert self.tracer is not None
        return self.tracer.start_span(name, context=propagate.extract(carrier),
                                      kind=SpanKind.SERVER, attributes=attributes)

    def span(self, name: str, attributes: dict[str, Any] | None = None
             ) -> AbstractContextManager[Any]:
        """A child span of the current request's server span around a block (nothing when
        tracing is off or the request is not sampled)."""
        parent = self.request_span()
        if parent is None:
            return _NULL
        return self._child(parent, name, attributes)

    def request_span(self) -> Span | None:
        """The current request's server span when it is recorded, else None."""
        if not self.on:
            return None
        context = CURRENT.get()
        if context is None or context.span is None or not context.span.is_recording():
            return None
        return context.span

    @contextmanager
    def _child(self, parent: Span, name: str, attributes: dict[str, Any] | None
               ) -> Iterator[Span]:
        from opentelemetry.trace import StatusCode, set_span_in_context

        assert self.tracer is not None
        span = self.tracer.start_span(name, context=set_span_in_context(parent),
                                      attributes=attributes)
        try:
            yield span
        except BaseException as e:
            span.set_status(StatusCode.ERROR, type(e).__name__)
            raise
        finally:
            span.end()

    def child(self, parent: Span, name: str, start_ns: int, end_ns: int,
              attributes: dict[str, Any] | None = None,
              links: Sequence[SpanContext] = ()) -> None:
        """A child span of ``parent`` for something already done, from its recorded times."""
        from opentelemetry.trace import Link, set_span_in_context

        assert self.tracer is not None
        span = self.tracer.start_span(name, context=set_span_in_context(parent),
                                      start_time=start_ns, attributes=attributes,
                                      links=[Link(c) for c in links])
        span.end(end_time=end_ns)

    def request_batches(self, parent: Span, submitted_ns: int,
                        batches: Sequence[BatchTrace | None]) -> None:
        """``queue wait``, then per batch the request's images ran in its ``forward`` (linked
        to the batch span) and ``store write`` spans; ``batches`` has one entry per image."""
        seen: dict[int, tuple[BatchTrace, int]] = {}
        for b in batches:
            if b is not None:
                _, count = seen.get(id(b), (b, 0))
                seen[id(b)] = (b, count + 1)
        if not seen:
            return
        runs = sorted(seen.values(), key=lambda item: item[0].start_ns)
        self.child(parent, "queue wait", submitted_ns, runs[0][0].start_ns)
        for batch, images in runs:
            self.child(parent, "forward", batch.start_ns, batch.end_ns,
                       {"imgrec.batch.size": batch.size, "imgrec.images": images},
                       links=[batch.context])
            if batch.store_start_ns:
                self.child(parent, "store write", batch.store_start_ns, batch.store_end_ns,
                           {"imgrec.stored": batch.stored})

    # -- a batch's span ------------------------------------------------------------------------
    def start_batch(self, parents: Sequence[SpanContext], size: int,
                    attributes: dict[str, Any]) -> tuple[Span, BatchTrace] | None:
        """The span of one forward pass, a trace of its own linked to each request it serves
        (None when none of them is traced)."""
        if not parents or self.tracer is None:
            return None
        from opentelemetry.context import Context
        from opentelemetry.trace import Link

        unique = list({(c.trace_id, c.span_id): c for c in parents}.values())
        now = time.time_ns()
        span = self.tracer.start_span("batch", context=Context(), start_time=now,
                                      links=[Link(c) for c in unique],
                                      attributes={"imgrec.batch.size": size,
                                                  "imgrec.batch.requests": len(unique),
                                                  **attributes})
        return span, BatchTrace(span.get_span_context(), size, now)


OFF = Tracing()
