"""The served model as Open Inference Protocol (KServe v2) tensors, for both protocol skins.

REST (app/api/oip/rest.py) and gRPC (app/api/oip/grpc_server.py) each parse their own wire
format into ``InputTensor`` values, call ``infer`` here and encode the ``OutputTensor`` values
it returns; the one Service does the work. The model's tensors:

* input ``image``: BYTES ``[N]`` or ``[N, 1]``, each element an encoded image file, through
  ``Service.infer`` (every format and limit ``/predict`` has);
* input ``pixels``: UINT8 ``[N, C, H, W]`` at the card's input size, through
  ``Service.infer_pixels``, for clients that decode themselves;
* outputs ``probabilities`` FP32 ``[N, classes]`` (softmax) and ``embedding`` FP32 ``[N, D]``;
  with the classification extension on ``probabilities``: BYTES ``[N, count]`` strings
  ``"score:index:label"``, best first;
* with a calibrated card (``imgrec calibrate``), also ``ood_score`` FP32 ``[N]`` (higher =
  less like the training data) and ``unknown`` BOOL ``[N]``, as ``/predict`` answers them;
  ``probabilities`` are then the calibrated ones.

The same tensors in Triton's model configuration form (``model_config``: the model
configuration extension, what perf_analyzer and Triton's tooling read first), with Triton's
convention: ``max_batch_size`` > 0, so each input's and output's ``dims`` leave out the batch
dimension (the metadata's shapes are ``[-1]`` followed by them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from app import __version__
from app.serving.errors import ServiceError
from app.serving.service import ImageResult, Service, Upload

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

    from app.model.card import ModelCard

SERVER_NAME = "imgrec"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
IMAGE, PIXELS = "image", "pixels"
PROBABILITIES, EMBEDDING = "probabilities", "embedding"
OOD_SCORE, UNKNOWN = "ood_score", "unknown"
OUTPUTS = (PROBABILITIES, EMBEDDING)
CALIBRATED_OUTPUTS = (OOD_SCORE, UNKNOWN)


def outputs_of(card: ModelCard) -> tuple[str, ...]:
    """The output tensors of this model: the unknown decision's only with a calibrated card."""
    return OUTPUTS + (CALIBRATED_OUTPUTS if card.calibration is not None else ())


def tensor_bytes(t: OutputTensor) -> bytes:
    """A tensor's raw little-endian bytes, as the binary extension and gRPC carry them."""
    if isinstance(t.data, np.ndarray):
        dtype = np.bool_ if t.datatype == "BOOL" else np.dtype("<f4")
        return t.data.astype(dtype, copy=False).tobytes()
    return serialize_bytes(t.data)
_LENGTH = struct.Struct("<I")


class OipError(Exception):
    """A refusal in the protocol's terms: the HTTP status, mapped by gRPC to its own codes
    (400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None,
                 www_authenticate: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.www_authenticate = www_authenticate


def bad(message: str) -> OipError:
    return OipError(400, message)


def from_service_error(e: ServiceError) -> OipError:
    """The one mapping of the Service's refusals to the protocol's, for REST and gRPC alike.
    The protocol knows fewer statuses than imgrec's JSON: every bad input (413, 415, 422...)
    is its 400; overload and not-ready stay 503, deadlines 504, a failed batch 500."""
    if 400 <= e.status < 500:
        return OipError(400, f"{e.code}: {e.message}")
    return OipError(e.status, e.message, e.retry_after)


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    # BYTES: the elements; UINT8: a flat array
    value: list[bytes] | np.ndarray


@dataclass(slots=True)
class RequestedOutput:
    name: str
    classification: int = 0  # top-k as "score:index:label" strings; 0 = the raw tensor
    binary: bool = False  # REST only: answer in the binary section (binary tensor data)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str  # FP32, BOOL or BYTES
    shape: list[int]
    data: np.ndarray | list[bytes]  # FP32: (N, K) float32; BYTES: row-major elements
    binary: bool = False


# -- the Service's rules, in the protocol's terms -----------------------------------------------
def check_model(service: Service, name: str, version: str | None) -> ModelCard:
    """The card when ``name`` (and ``version``, if given) is the served model; else 404."""
    card = service.card
    if name != card.name:
        raise OipError(404, f"unknown model '{name}'; this server serves '{card.name}'")
    if version and version != card.version:
        raise OipError(404, f"unknown version '{version}' of model '{name}'; this server "
                       f"serves version '{card.version}'")
    return card


def check_ready(service: Service) -> None:
    """503 unless the Service is ready (loaded, warm, not draining)."""
    if not service.ready:
        raise OipError(503, f"not ready: {service.state.value}", service.settings.retry_after_s)


def server_metadata() -> dict[str, object]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(card: ModelCard) -> dict[str, object]:
    spec = card.input
    return {
        "name": card.name, "versions": [card.version], "platform": SERVER_NAME,
        "inputs": [
            # [N, 1], Triton's form for one encoded file per batch element ([N] is accepted too)
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": PIXELS, "datatype": "UINT8",
             "shape": [-1, spec.channels, spec.size, spec.size]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(card.labels)]},
            {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, card.embedding_dim]},
            *([{"name": OOD_SCORE, "datatype": "FP32", "shape": [-1]},
               {"name": UNKNOWN, "datatype": "BOOL", "shape": [-1]}]
              if card.calibration is not None else []),
        ],
    }


def model_config(service: Service) -> model_config_pb2.ModelConfig:
    """The served model in Triton's ``ModelConfig`` form (model_config.proto), for both skins.

    ``max_batch_size`` is what one request may carry (IMGREC_MAX_FILES): Triton's clients read
    it as the largest batch to send, and imgrec splits a request into forward passes of
    IMGREC_MAX_BATCH_SIZE itself (``preferred_batch_size``, the batch its batcher fills when it
    waits). Both inputs are ``optional``: a request sends exactly one of them."""
    from tritonclient.grpc import model_config_pb2 as mc  # also what the gRPC skin imports

    card, s = service.card, service.settings
    predictor = service.predictor
    assert predictor is not None  # service.card refuses while there is none
    spec = card.input
    return mc.ModelConfig(
        name=card.name, platform=SERVER_NAME, backend=predictor.engine.name,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=s.max_files,
        input=[
            # dims [1] reshaped to [], Triton's idiom for one element per batch entry
            mc.ModelInput(name=IMAGE, data_type=mc.TYPE_STRING, dims=[1],
                          reshape=mc.ModelTensorReshape(shape=[]), optional=True),
            mc.ModelInput(name=PIXELS, data_type=mc.TYPE_UINT8, format=mc.ModelInput.FORMAT_NCHW,
                          dims=[spec.channels, spec.size, spec.size], optional=True),
        ],
        output=[
            mc.ModelOutput(name=PROBABILITIES, data_type=mc.TYPE_FP32, dims=[len(card.labels)]),
            mc.ModelOutput(name=EMBEDDING, data_type=mc.TYPE_FP32, dims=[card.embedding_dim]),
            *([mc.ModelOutput(name=OOD_SCORE, data_type=mc.TYPE_FP32, dims=[1],
                              reshape=mc.ModelTensorReshape(shape=[])),
               mc.ModelOutput(name=UNKNOWN, data_type=mc.TYPE_BOOL, dims=[1],
                              reshape=mc.ModelTensorReshape(shape=[]))]
              if card.calibration is not None else []),
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=[s.max_batch_size] if s.max_batch_size <= s.max_files else [],
            max_queue_delay_microseconds=round(s.max_wait_ms * 1000),
            # imgrec's queue bound counts images, Triton's requests: with one image per request
            # (perf_analyzer's default) they are the same; an image still queued at its
            # deadline is refused (504), Triton's REJECT
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=round(s.request_timeout_ms * 1000),
                max_queue_size=s.max_queue)),
        instance_group=[_instance_group(card.name, str(predictor.device))],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in (
            ("weights_sha256", card.weights_sha256), ("engine", predictor.engine.name),
            ("dtype", predictor.dtype), ("device", str(predictor.device)),
            ("version", card.version))},
    )


def _instance_group(name: str, device: str) -> model_config_pb2.ModelInstanceGroup:
    """One model copy on one device (README: one process, one model copy, one device)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return mc.ModelInstanceGroup(name=name, kind=mc.ModelInstanceGroup.KIND_GPU, count=1,
                                     gpus=[index])
    return mc.ModelInstanceGroup(name=name, kind=mc.ModelInstanceGroup.KIND_CPU, count=1)


# -- wire helpers shared by the two skins -------------------------------------------------------
def bytes_elements(raw: bytes | memoryview) -> list[bytes]:
    """Triton's serialisation of a BYTES tensor: each element a 4-byte little-endian length,
    then its bytes (the binary data extension and gRPC's raw contents)."""
    view = memoryview(raw)
    out: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise bad("BYTES tensor data ends inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + n > end:
            raise bad(f"BYTES tensor element of {n} bytes runs past the end of its data")
        out.append(bytes(view[offset:offset + n]))
        offset += n
    return out


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    parts: list[bytes] = []
    for e in elements:
        parts.append(_LENGTH.pack(len(e)))
        parts.append(e)
    return b"".join(parts)


def uint8_values(values: object) -> np.ndarray:
    """JSON numbers or gRPC uint_contents as a flat uint8 array, each checked to be 0..255."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError):
        raise bad("UINT8 tensor data must be a (nested) list of integers") from None
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
        raise bad("UINT8 tensor data must be integers from 0 to 255")
    return arr.astype(np.uint8, copy=False).reshape(-1)


# -- inference ---------------------------------------------------------------------------------
def _batch_size(t: InputTensor) -> int:
    """The tensor's first dimension (the Service bounds it, as it bounds every protocol's)."""
    if not t.shape or any(not isinstance(d, int) or d < 0 for d in t.shape):
        raise bad(f"input '{t.name}': shape must be a list of non-negative integers")
    if t.shape[0] < 1:
        raise bad(f"input '{t.name}': at least one image")
    return t.shape[0]


async def _run_inputs(service: Service, inputs: Sequence[InputTensor],
                      namespace: str | None) -> list[ImageResult]:
    names = [t.name for t in inputs]
    unknown = [n for n in names if n not in (IMAGE, PIXELS)]
    if unknown:
        raise bad(f"unknown input '{unknown[0]}'; this model takes '{IMAGE}' (BYTES, encoded "
                  f"image files) or '{PIXELS}' (UINT8 [N, C, H, W])")
    if len(inputs) != 1:
        raise bad(f"send exactly one input, '{IMAGE}' or '{PIXELS}' (got {names})")
    t = inputs[0]
    if t.name == IMAGE:
        return await service.infer(_image_files(t), namespace)
    return await service.infer_pixels(_pixels(t, service.card), namespace)


def _image_files(t: InputTensor) -> list[Upload]:
    n = _batch_size(t)
    if t.datatype != "BYTES":
        raise bad(f"input '{IMAGE}' must be BYTES, got {t.datatype}")
    if t.shape not in ([n], [n, 1]):
        raise bad(f"input '{IMAGE}' must have shape [N] or [N, 1], got {t.shape}")
    assert isinstance(t.value, list)
    if len(t.value) != n:
        raise bad(f"input '{IMAGE}': shape {t.shape} but {len(t.value)} elements")
    return [Upload(data) for data in t.value]


def _pixels(t: InputTensor, card: ModelCard) -> np.ndarray:
    spec = card.input
    want = [_batch_size(t), spec.channels, spec.size, spec.size]
    if t.datatype != "UINT8":
        raise bad(f"input '{PIXELS}' must be UINT8, got {t.datatype}")
    if t.shape != want:
        raise bad(f"input '{PIXELS}' must have shape [N, C, H, W] = {want} (the model's "
                  f"input size), got {t.shape}")
    assert isinstance(t.value, np.ndarray)
    if t.value.size != int(np.prod(want)):
        raise bad(f"input '{PIXELS}': shape {t.shape} needs {int(np.prod(want))} values, got "
                  f"{t.value.size}")
    return t.value.reshape(want)


def check_outputs(card: ModelCard, requested: Sequence[RequestedOutput] | None,
                  binary_default: bool) -> list[RequestedOutput]:
    """The outputs to answer, in the order asked (all of them when none are named)."""
    names = outputs_of(card)
    if not requested:
        return [RequestedOutput(name, 0, binary_default) for name in names]
    seen: set[str] = set()
    for o in requested:
        if o.name not in names:
            raise bad(f"unknown output '{o.name}'; this model has {list(names)}")
        if o.name in seen:
            raise bad(f"output '{o.name}' requested twice")
        seen.add(o.name)
        if o.classification and o.name != PROBABILITIES:
            raise bad(f"classification applies to '{PROBABILITIES}', not '{o.name}'")
        if not 0 <= o.classification <= len(card.labels):
            raise bad(f"classification count must be 1 to {len(card.labels)} (the model's "
                      f"classes), got {o.classification}")
    return list(requested)


def _score(value: np.float32) -> str:
    # the shortest text that reads back as the same float32
    return np.format_float_positional(value, unique=True, trim="0")


def classify(probs: np.ndarray, labels: Sequence[str], count: int) -> list[bytes]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :count]
    return [f"{_score(probs[row, i])}:{i}:{labels[i]}".encode()
            for row in range(probs.shape[0]) for i in order[row]]


async def infer(service: Service, inputs: Sequence[InputTensor],
                outputs: Sequence[RequestedOutput] | None, namespace: str | None,
                binary_default: bool = False) -> tuple[ModelCard, int, list[OutputTensor]]:
    """Run the request through the Service; (the card of the model that computed the answer,
    which a model update may have replaced meanwhile; images answered; the output tensors)."""
    wanted = check_outputs(service.card, outputs, binary_default)
    results = await _run_inputs(service, inputs, namespace)
    card, n = results[0].card, len(results)
    out: list[OutputTensor] = []
    for o in wanted:
        if o.name == PROBABILITIES:
            probs = np.stack([r.prediction.probs for r in results]).astype(np.float32,
                                                                           copy=False)
            if o.classification:
                out.append(OutputTensor(o.name, "BYTES", [n, o.classification],
                                        classify(probs, card.labels, o.classification),
                                        o.binary))
            else:
                out.append(OutputTensor(o.name, "FP32", list(probs.shape), probs, o.binary))
        elif o.name == EMBEDDING:
            emb = np.stack([r.prediction.embedding for r in results]).astype(np.float32,
                                                                            copy=False)
            out.append(OutputTensor(o.name, "FP32", list(emb.shape), emb, o.binary))
        else:
            out.append(_decision(o, results))
    return card, n, out


def _decision(o: RequestedOutput, results: Sequence[ImageResult]) -> OutputTensor:
    """``ood_score`` or ``unknown`` of each image (a model update between the check and the
    run to an uncalibrated card answers NaN and false rather than fail)."""
    if o.name == OOD_SCORE:
        scores = np.array([np.nan if r.prediction.ood_score is None else r.prediction.ood_score
                           for r in results], np.float32)
        return OutputTensor(o.name, "FP32", [len(results)], scores, o.binary)
    flags = np.array([bool(r.prediction.unknown) for r in results], np.bool_)
    return OutputTensor(o.name, "BOOL", [len(results)], flags, o.binary)
