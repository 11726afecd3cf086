"""All service settings in one typed class, read from IMGREC_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# beyond this (200 MP: the largest phone sensors' JPEGs are 16320 x 12240) an image is refused
# from its header alone, whatever the format and however small it would decode
MAX_IMAGE_HEADER_PIXELS = 210_000_000
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGREC_", extra="ignore")

    # model and device
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="model directory to serve")
    device: str = Field("auto", description="auto (GPU when CUDA is available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU")
    engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="auto = ONNX Runtime on CPU (the directory's model.onnx, no PyTorch "
        "loaded; exported at start-up if missing), PyTorch on CUDA")
    torch_threads: int = Field(1, ge=0, description="intra-op threads of the inference engine "
                               "(0 = torch's default); the HTTP side needs a core too")
    # inference graph precision (issue 15)
    precision: Literal["float32", "int8"] = Field(
        "float32", description="int8 = the directory's static int8 graph with ONNX Runtime on "
        "the CPU; refused unless its card holds the graph's measured test top-1")
    # unknown pictures (issue 22): the card's operating point, or another from its table
    ood_known_fraction: float | None = Field(
        None, gt=0, le=1, description="move the unknown threshold to the one that calls this "
        "fraction of the validation images known (the card's table: 0.5 to 1.0); unset = the "
        "card's operating point (0.95 for imgrec calibrate's default)")
    warmup_batches: int = Field(2, ge=0, description="warm-up forward passes before ready")
    # model updates (app/serving/model_swap.py): SIGHUP, or a change seen by this poll
    model_watch_interval_s: float = Field(5.0, ge=0, description="how often to check whether "
                                          "IMGREC_MODEL_DIR leads to another directory (a "
                                          "symlink switched) or card, and switch to it with no "
                                          "request lost; 0 = only on SIGHUP")
    # micro-batching
    max_batch_size: int = Field(32, ge=1, description="images per forward pass")
    max_wait_ms: float = Field(0.0, ge=0, description="hold a batch open this long for more "
                               "images (0 = greedy: run whatever is queued when idle)")
    max_queue: int = Field(1024, ge=1, description="images waiting; beyond it 503 + Retry-After")
    request_timeout_ms: float = Field(10_000, gt=0, description="deadline per request; an image "
                                      "still queued then is answered 504 and never run")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 503")
    decode_threads: int = Field(2, ge=1, description="threads decoding and preprocessing uploads")
    decode_inline_pixels: int = Field(16_384, ge=0, description="an upload that decodes to "
                                      "fewer pixels than this (128x128) is decoded on the event "
                                      "loop, saving two thread hops; larger ones go to the "
                                      "decode threads; 0: all do")
    # request limits
    max_files: int = Field(32, ge=1, description="file parts per request")
    # 32 MiB: a 48-50 MP phone JPEG is 10-25 MB (a 12 MP one 3-6 MB, HEIC about half)
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body size")
    # pixels an image decodes to (a JPEG after DCT scaling, at most 1/8 of each side), checked
    # before decoding: 50 MP takes a 50 MP HEIC or PNG, which decode at full size
    max_image_pixels: int = Field(50_000_000, ge=1, description="pixels an image may decode "
                                  "to, checked before decoding")
    # decompression-bomb ceiling on the header's width x height, whatever the format
    max_image_header_pixels: int = Field(MAX_IMAGE_HEADER_PIXELS, ge=1, description="width x "
                                         "height in an image's header, checked before "
                                         "decoding")
    # embedding store
    embed_store: str = Field("data/embeddings.sqlite3", description="SQLite file path, "
                             "redis://host:port/db, or 'memory'")
    embed_store_max_items: int = Field(1_000_000, ge=1, description="vectors kept; oldest "
                                       "evicted first")
    embed_store_ann_index: bool = Field(True, description="keep an approximate (HNSW) index "
                                        "beside a SQLite store, saved in <file>.ann/; off: "
                                        "every search scans the table exactly")
    # embedding-store outages and API keys (README: "API keys", "When the store is down")
    embed_store_timeout_s: float = Field(1.0, gt=0, description="longest wait of one store "
                                         "call (Redis network, SQLite lock) before it counts "
                                         "as an outage")
    embed_store_backoff_min_s: float = Field(0.5, gt=0, description="first wait before probing "
                                             "a store that failed; doubles per failed probe")
    embed_store_backoff_max_s: float = Field(10.0, gt=0, description="longest wait between "
                                             "probes of a store that is down")
    api_keys_file: Path | None = Field(None, description="file of API keys, one per line; when "
                                       "set, inference and store routes need `Authorization: "
                                       "Bearer <key>`; re-read on SIGHUP")
    # HTTP server (imgrec serve)
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    graceful_shutdown_s: float = Field(30.0, gt=0, description="time to answer accepted work "
                                       "on shutdown")
    # shutdown and connection limits (app/serve/http_server.py)
    drain_delay_s: float = Field(2.0, ge=0, description="lame duck after SIGTERM: readiness "
                                 "503 while requests are still served, with Connection: close")
    header_timeout_s: float = Field(10.0, gt=0, description="request line and headers must "
                                    "arrive within this (from the connect, or the request's "
                                    "first byte on a reused connection); else 408")
    body_timeout_s: float = Field(60.0, gt=0, description="the request body must arrive within "
                                  "this after its headers; else 408")
    max_connections: int = Field(0, ge=0, description="open connections (0 = from the "
                                 "open-file limit: at least 10,000 where the hard limit allows); "
                                 "at the cap a new one closes the one waiting longest for its "
                                 "request (headers, or idle), else is answered 503 + Retry-After")
    log_level: str = Field("info", description="log level (imgrec's and uvicorn's)")
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON "
                                                "object per line (app/serve/logs.py)")
    access_log: bool = Field(False, description="a line per request: route, status, duration, "
                             "request id (costs CPU per request)")
    # Open Inference Protocol over gRPC (issue 14): same process, same batcher as HTTP
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port of the Open Inference "
                           "Protocol (inference.GRPCInferenceService) on IMGREC_HOST; 0 = off")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_files > self.max_queue:
            raise ValueError(f"max_files ({self.max_files}) must not exceed max_queue "
                             f"({self.max_queue}): such a request could never be queued")
        return self
