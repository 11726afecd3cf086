"""Open Inference Protocol (KServe v2) over REST, on the HTTP port, with Triton's binary tensor
data and classification extensions: a translator between the protocol's bodies and the Service.

Served as a plain ASGI middleware, outside FastAPI's routing, for two reasons: the binary body (a
JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensor data) cannot be
described truthfully in OpenAPI -- the protocol has its own specification, so these routes stay
out of /openapi.json -- and the binary path must cost no more per request than /predict's
fast path. Errors are the protocol's ``{"error": "..."}`` with its statuses (400, 404, 405,
413, 503, 504), not imgrec's ``{"error": {"code", "message"}}``: that is what OIP clients read.

Routes (each model route also under ``/v2/models/{name}/versions/{version}``):
``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}``,
``GET /v2/models/{name}/ready``, ``GET /v2/models/{name}/config`` (Triton's model configuration
extension), ``POST /v2/models/{name}/infer``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import zlib
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.auth import KeyRing, Unauthorized
from app.api.oip.core import (
    InputTensor,
    OipError,
    OutputTensor,
    RequestedOutput,
    bad,
    bytes_elements,
    check_model,
    check_ready,
    from_service_error,
    infer,
    model_config,
    model_metadata,
    server_metadata,
    tensor_bytes,
    uint8_values,
)
from app.serving.errors import ServiceError
from app.serving.service import Service

log = logging.getLogger("imgrec.oip")
PREFIX = "/v2"
HEADER_LENGTH = b"inference-header-content-length"
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/octet-stream"

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]


def handles(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def route_template(path: str) -> str:
    """The path with the model's name and version taken out: a bounded metrics label."""
    parts = path.split("/")[2:]
    if parts[:1] == ["models"] and len(parts) >= 2:
        rest = parts[2:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        return "/v2/models/{name}" + "".join("/" + p for p in rest[:1])
    if parts in ([], [""], ["health", "live"], ["health", "ready"]):
        return "/".join(["/v2", *parts]).rstrip("/")
    return "/v2/other"


def _json(status: int, content: object, headers: list[tuple[bytes, bytes]] | None = None
          ) -> Answer:
    return status, orjson.dumps(content), [(b"content-type", JSON_TYPE), *(headers or [])]


def _error(e: OipError) -> Answer:
    headers = ([(b"retry-after", str(e.retry_after).encode())]
               if e.retry_after is not None else [])
    if e.www_authenticate is not None:
        headers.append((b"www-authenticate", e.www_authenticate.encode("latin-1")))
    return _json(e.status, {"error": e.message}, headers)


class OipMiddleware:
    """Serves every path under /v2 itself (never passed on); with API keys, an inference needs
    one (its health and metadata stay open), checked here so that the refusal is the
    protocol's body, as gRPC's is its status."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None = None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not handles(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["route"] = route_template(scope["path"])  # the metrics middleware's label
        try:
            state["namespace"] = self._namespace(scope)
            status, body, headers = await _dispatch(scope, receive)
        except ServiceError as e:
            status, body, headers = _error(from_service_error(e))
        except OipError as e:
            status, body, headers = _error(e)
        except Exception:
            log.exception("OIP request failed")
            status, body, headers = _json(500, {"error": "internal error"})
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


    def _namespace(self, scope: Scope) -> str | None:
        """The caller's store namespace from its API key (None without keys configured)."""
        if self.keys is None or scope["method"] in ("GET", "HEAD"):
            return None
        authorization = next((v.decode("latin-1") for k, v in scope["headers"]
                              if k == b"authorization"), None)
        try:
            return self.keys.check(authorization)
        except Unauthorized as e:
            scope["app"].state.service.metrics.rejections.labels("unauthorized").inc()
            raise OipError(401, e.message, www_authenticate=e.challenge) from None


def _method(scope: Scope, allowed: str) -> None:
    if scope["method"] != allowed:
        raise OipError(405, f"method {scope['method']} not allowed; use {allowed}")


async def _dispatch(scope: Scope, receive: Receive) -> Answer:
    service: Service = scope["app"].state.service
    parts = scope["path"].split("/")[2:]
    if parts in ([], [""]):
        _method(scope, "GET")
        return _json(200, server_metadata())
    if parts == ["health", "live"]:
        _method(scope, "GET")
        return _json(200, {"live": True})
    if parts == ["health", "ready"]:
        _method(scope, "GET")
        check_ready(service)
        return _json(200, {"ready": True})
    if parts[:1] != ["models"] or len(parts) < 2 or not parts[1]:
        raise OipError(404, f"no such route: {scope['path']}")
    name, rest, version = parts[1], parts[2:], None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            raise OipError(404, f"no such route: {scope['path']}")
        version, rest = rest[1], rest[2:]
    return await _model_route(scope, receive, service, name, version, rest)


async def _model_route(scope: Scope, receive: Receive, service: Service, name: str,
                       version: str | None, rest: list[str]) -> Answer:
    """What follows /v2/models/{name}[/versions/{version}]."""
    if rest == []:
        _method(scope, "GET")
        return _json(200, model_metadata(check_model(service, name, version)))
    if rest == ["ready"]:
        _method(scope, "GET")
        card = check_model(service, name, version)
        check_ready(service)
        return _json(200, {"name": card.name, "ready": True})
    if rest == ["config"]:
        _method(scope, "GET")
        check_model(service, name, version)
        return _json(200, config_json(model_config(service)))
    if rest == ["infer"]:
        _method(scope, "POST")
        return await _infer(scope, receive, service, name, version)
    raise OipError(404, f"no such route: {scope['path']}")


# -- config --------------------------------------------------------------------------------------
_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def config_json(config: Message) -> dict[str, Any]:
    """A ModelConfig as Triton's REST API answers it: the proto field names (``max_batch_size``,
    ``data_type``), every scalar field even at its default, enums by name, and 64-bit integers
    as JSON numbers (protobuf's JSON mapping writes them as strings; Triton turns them back,
    and perf_analyzer reads ``dims`` as numbers)."""
    try:
        out = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 names the option differently
        out = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                        including_default_value_fields=True)
    _int64_as_numbers(out, config.DESCRIPTOR)
    return out


def _int64_as_numbers(obj: dict[str, Any], descriptor: Descriptor) -> None:
    for field in descriptor.fields:
        if field.name not in obj:
            continue
        value = obj[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for v in value.values():
                    _int64_as_numbers(v, value_field.message_type)
        elif field.message_type is not None:
            for v in value if isinstance(value, list) else [value]:
                _int64_as_numbers(v, field.message_type)
        elif field.cpp_type in _INT64:
            obj[field.name] = ([int(v) for v in value] if isinstance(value, list)
                               else int(value))


# -- infer ---------------------------------------------------------------------------------------
async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise OipError(413, f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise bad("client disconnected before the body ended")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise OipError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding in (b"gzip", b"deflate"):
        body = _inflate(body, encoding, limit)
    elif encoding not in (b"", b"identity"):
        raise OipError(400, f"Content-Encoding {encoding.decode('latin-1')} is not supported; "
                       "use gzip, deflate or none")
    return body


def _inflate(body: bytes, encoding: bytes, limit: int) -> bytes:
    """tritonclient's request compression, bounded: a small body never inflates past the
    same byte limit an uncompressed one has."""
    inflater = zlib.decompressobj(31 if encoding == b"gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad(f"the {encoding.decode()} body could not be decompressed: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise OipError(413, f"decompressed request body exceeds {limit} bytes")
    return out


def _split(scope: Scope, body: bytes) -> tuple[Any, memoryview]:
    """The JSON header and the binary section after it (binary tensor data extension)."""
    raw = dict(scope["headers"]).get(HEADER_LENGTH)
    view = memoryview(body)
    if raw is None:
        header, binary = view, view[len(view):]
    else:
        try:
            n = int(raw)
        except ValueError:
            raise bad("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(body):
            raise bad(f"Inference-Header-Content-Length {n} does not fit the {len(body)}-byte "
                      "body")
        header, binary = view[:n], view[n:]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise bad(f"the inference request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise bad("the inference request must be a JSON object")
    return request, binary


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"{where}: parameters must be an object")
    return params


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if all(not isinstance(d, list) for d in data):
        return data
    out: list[Any] = []
    for d in data:
        out.extend(_flatten(d))
    return out


def _json_bytes(data: Any, name: str, b64: bool) -> list[bytes]:
    values = _flatten(data)
    if not all(isinstance(v, str) for v in values):
        raise bad(f"input '{name}': BYTES data in JSON must be strings")
    if not b64:
        return [v.encode() for v in values]
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, ValueError):
        raise bad(f"input '{name}': not valid base64 (parameters.content_type is "
                  "'base64')") from None


def _inputs(request: dict[str, Any], binary: memoryview) -> list[InputTensor]:
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad("'inputs' must be a non-empty list")
    out: list[InputTensor] = []
    offset = 0
    for item in raw_inputs:
        tensor, used = _input(item, binary[offset:])
        offset += used
        out.append(tensor)
    if offset != len(binary):
        raise bad(f"the binary section has {len(binary)} bytes but the inputs' "
                  f"binary_data_size add up to {offset}")
    return out


def _input(item: Any, binary: memoryview) -> tuple[InputTensor, int]:
    """One input of the request, and the bytes of the binary section it took."""
    if not isinstance(item, dict):
        raise bad("each input must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise bad("each input needs a 'name' and a 'datatype' (strings)")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise bad(f"input '{name}': 'shape' must be a list of integers")
    if datatype not in ("BYTES", "UINT8"):
        raise bad(f"input '{name}': datatype {datatype} is not one this model takes "
                  "(BYTES or UINT8)")
    params = _params(item, f"input '{name}'")
    size = params.get("binary_data_size")
    value: list[bytes] | np.ndarray
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise bad(f"input '{name}': binary_data_size {size} does not fit the binary "
                      "section")
        chunk = binary[:size]
        value = bytes_elements(chunk) if datatype == "BYTES" else np.frombuffer(chunk, np.uint8)
        return InputTensor(name, datatype, shape, value), size
    if "data" not in item:
        raise bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if datatype == "BYTES":
        value = _json_bytes(item["data"], name, params.get("content_type") == "base64")
    else:
        value = uint8_values(item["data"])
    return InputTensor(name, datatype, shape, value), 0


def _outputs(request: dict[str, Any]) -> tuple[list[RequestedOutput] | None, bool]:
    binary_default = _params(request, "request").get("binary_data_output") is True
    raw = request.get("outputs")
    if raw is None:
        return None, binary_default
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise bad("'outputs' must be a list of objects")
    out = []
    for o in raw:
        name = o.get("name")
        if not isinstance(name, str):
            raise bad("each requested output needs a 'name'")
        params = _params(o, f"output '{name}'")
        count = params.get("classification", 0)
        if type(count) is not int or count < 0:
            raise bad(f"output '{name}': classification must be a positive integer")
        binary = params.get("binary_data", binary_default)
        out.append(RequestedOutput(name, count, binary is True))
    return out, binary_default


def _encode(request: dict[str, Any], name: str, version: str,
            outputs: list[OutputTensor]) -> Answer:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": o.shape}
        if o.binary:
            blob = tensor_bytes(o)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(o.data, np.ndarray):
            entry["data"] = o.data.reshape(-1)
        else:
            entry["data"] = [e.decode() for e in o.data]
        entries.append(entry)
    response: dict[str, Any] = {"model_name": name, "model_version": version,
                                "outputs": entries}
    if isinstance(request.get("id"), str):
        response["id"] = request["id"]
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return 200, header, [(b"content-type", JSON_TYPE)]
    return 200, b"".join([header, *blobs]), [
        (b"content-type", BINARY_TYPE),
        (b"inference-header-content-length", str(len(header)).encode())]


async def _infer(scope: Scope, receive: Receive, service: Service, name: str,
                 version: str | None) -> Answer:
    check_model(service, name, version)
    service.check_accepting()  # before the body is read: a refusal costs no upload
    with service.tracing.span("read upload") as span:
        body = await _read_body(scope, receive, service.settings.max_upload_bytes)
        if span is not None:
            span.set_attribute("imgrec.bytes", len(body))
    request, binary = _split(scope, body)
    inputs = _inputs(request, binary)
    outputs, binary_default = _outputs(request)
    state = scope["state"]
    card, images, tensors = await infer(service, inputs, outputs, state["namespace"],
                                        binary_default)
    state["images"] = images  # read by the metrics middleware
    return _encode(request, card.name, card.version, tensors)  # the model that computed them
