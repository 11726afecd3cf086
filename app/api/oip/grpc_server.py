"""Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on IMGREC_GRPC_PORT,
a translator between the protocol's messages and the one Service.

The messages and the servicer base are the generated code tritonclient ships (Triton's
``inference.GRPCInferenceService``, a superset of KServe's v2 service): imgrec writes no
protocol code of its own. The server is grpcio's asyncio server on the event loop uvicorn
runs, so its requests join the very same micro-batches as HTTP's. It starts in the app's
lifespan once the Service is ready and stops there: new RPCs are refused (UNAVAILABLE) once
the Service drains, and those in flight are answered within the grace period.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig (Triton's
model configuration extension), ModelInfer; Triton's
other RPCs (repository, shared memory, statistics...) answer UNIMPLEMENTED from the base class.
With API keys (IMGREC_API_KEYS_FILE), ModelInfer needs ``authorization: Bearer <key>`` metadata
(UNAUTHENTICATED otherwise) and stores vectors in that key's namespace, as HTTP does; health and
metadata stay open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.api.auth import KeyRing, Unauthorized
from app.api.oip.core import (
    InputTensor,
    OipError,
    RequestedOutput,
    bad,
    bytes_elements,
    check_model,
    from_service_error,
    infer,
    model_config,
    model_metadata,
    server_metadata,
    tensor_bytes,
    uint8_values,
)
from app.api.request_middleware import access_line, finish_span, start
from app.serving.errors import ServiceError
from app.serving.request_context import CURRENT, RequestContext
from app.serving.service import Service

log = logging.getLogger("imgrec.grpc")
SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
         401: grpc.StatusCode.UNAUTHENTICATED, 413: grpc.StatusCode.INVALID_ARGUMENT,
         503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}
# a request message may carry max_upload_bytes of tensor data plus its framing
MESSAGE_OVERHEAD_BYTES = 64 * 1024

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _begin(service: Service, method: str, context: grpc.aio.ServicerContext
           ) -> RequestContext:
    """The call's request id (the client's ``x-request-id`` metadata when well formed) and,
    when tracing is on, its server span, continuing the ``traceparent`` in its metadata."""
    metadata = [(str(k), str(v)) for k, v in context.invocation_metadata() or ()
                if isinstance(v, str)]
    sent = next((v for k, v in metadata if k == "x-request-id"), None)
    return start(service.tracing, sent, f"{SERVICE}/{method}", metadata, {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method})


def _rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Counts the call in imgrec's request metrics and turns a refusal (the Service's, through
    the protocol's one mapping, or the protocol's own) into its gRPC status; an unexpected
    failure answers INTERNAL and the server goes on. Like HTTP's requests, each call has a
    request id (answered as ``x-request-id`` metadata, carried by its log lines), a server span
    when tracing is on and an access line with IMGREC_ACCESS_LOG."""
    name = method.__name__
    route = f"gRPC {name}"

    @wraps(method)
    async def counted(self: InferenceServicer, request: Req,
                      context: grpc.aio.ServicerContext) -> Resp:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        call = _begin(self.service, name, context)
        token = CURRENT.set(call)
        await context.send_initial_metadata((("x-request-id", call.request_id),))
        try:
            try:
                return await method(self, request, context)
            except ServiceError as e:
                raise from_service_error(e) from None
        except OipError as e:
            code = CODES.get(e.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, e.message)
        except Exception:
            log.exception("%s failed", route)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, "internal error")
        finally:
            seconds = time.perf_counter() - started
            m = self.service.metrics
            m.requests.labels(route, code.name).inc()
            m.latency.labels(route).observe(seconds)
            failed = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED)
            finish_span(call, f"{SERVICE}/{name}", code.name if failed else None,
                        {"rpc.grpc.status_code": code.value[0]})
            if self.service.settings.access_log:
                access_line("gRPC", f"/{SERVICE}/{name}", name, code.name, seconds)
            CURRENT.reset(token)
        raise AssertionError("unreachable: abort raises")

    return counted


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service, keys: KeyRing | None = None) -> None:
        self.service = service
        self.keys = keys

    def _namespace(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's store namespace from its API key (None without keys configured)."""
        if self.keys is None:
            return None
        authorization = next((str(v) for k, v in context.invocation_metadata() or ()
                              if k == "authorization"), None)
        try:
            return self.keys.check(authorization)
        except Unauthorized as e:
            self.service.metrics.rejections.labels("unauthorized").inc()
            raise OipError(401, e.message) from None

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        check_model(self.service, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.service.ready)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        card = check_model(self.service, request.name, request.version or None)
        meta: dict[str, Any] = model_metadata(card)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        check_model(self.service, request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(self.service))

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        namespace = self._namespace(context)
        check_model(self.service, request.model_name, request.model_version or None)
        inputs = _inputs(request)
        outputs = [RequestedOutput(o.name, _classification(o)) for o in request.outputs]
        card, _, tensors = await infer(self.service, inputs, outputs or None, namespace)
        response = pb.ModelInferResponse(model_name=card.name, model_version=card.version,
                                         id=request.id)
        for t in tensors:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(tensor_bytes(t))
        return response


def _classification(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    if "classification" not in output.parameters:
        return 0
    count = int(output.parameters["classification"].int64_param)
    if count < 0:
        raise bad(f"output '{output.name}': classification must be a positive integer")
    return count


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """Tensors from raw_input_contents (what tritonclient sends) or from typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out: list[InputTensor] = []
    for i, t in enumerate(request.inputs):
        value: list[bytes] | np.ndarray
        if t.datatype == "BYTES":
            value = bytes_elements(raw[i]) if raw else list(t.contents.bytes_contents)
        elif t.datatype == "UINT8":
            value = (np.frombuffer(raw[i], np.uint8) if raw
                     else uint8_values(list(t.contents.uint_contents)))
        else:
            raise bad(f"input '{t.name}': datatype {t.datatype} is not one this model takes "
                      "(BYTES or UINT8)")
        out.append(InputTensor(t.name, t.datatype, list(t.shape), value))
    return out


async def start_grpc(service: Service, keys: KeyRing | None = None) -> grpc.aio.Server | None:
    """Serve the protocol on IMGREC_HOST:IMGREC_GRPC_PORT (None when the port is 0)."""
    s = service.settings
    if s.grpc_port == 0:
        return None
    limit = s.max_upload_bytes + MESSAGE_OVERHEAD_BYTES
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(service, keys), server)
    host = f"[{s.host}]" if ":" in s.host else s.host
    server.add_insecure_port(f"{host}:{s.grpc_port}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s:%d", host, s.grpc_port)
    return server


async def stop_grpc(server: grpc.aio.Server | None, grace_s: float) -> None:
    """Refuse new RPCs and answer those in flight within ``grace_s``."""
    if server is not None:
        await server.stop(grace_s)
