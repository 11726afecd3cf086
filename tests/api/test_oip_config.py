"""Triton's model configuration extension (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``)
through the real tritonclient clients, and Triton's own benchmark tool, perf_analyzer, run
against a live server with real PNG and JPEG files.

perf_analyzer is the binary that tritonclient 2.50.0's wheel carries (bench/perf_analyzer.py
--setup fetches it; ./dev setup runs that): the test runs the real tool rather than a replay of
its request sequence, since the tool is ~20 MB of downloads and is what operators will point at
imgrec. Without it the test skips on a workstation and fails in CI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import json_format
from helpers.apps import LiveServer, metric, running
from helpers.daemons import in_ci
from helpers.images import encode, png_bytes
from helpers.models import LABELS
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from app.main import create_app
from app.settings import Settings

MODEL = "test-fashion-small"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[LiveServer]:
    # the torch engine, so that the configuration's backend is checked as a non-default one
    with LiveServer(served_model_dir, tmp_path_factory.mktemp("oip-config"),
                    engine="torch") as server:
        yield server


@pytest.fixture()
def http(live: LiveServer) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(live.url)
    yield client
    client.close()


@pytest.fixture()
def rpc(live: LiveServer) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(live.grpc_url)
    yield client
    client.close()


def as_message(config: dict[str, Any]) -> mc.ModelConfig:
    """REST's JSON read back as Triton's ModelConfig: an unknown field or a wrong type fails."""
    return json_format.ParseDict(config, mc.ModelConfig())


# -- the configuration ----------------------------------------------------------------------------
def test_http_config_is_tritons_model_config(http: thttp.InferenceServerClient,
                                             live: LiveServer) -> None:
    s = live.service.settings
    for version in ("", "0"):
        config = http.get_model_config(MODEL, version)
        assert config["name"] == MODEL and config["platform"] == "imgrec"
        assert config["backend"] == "torch"  # the engine this server runs
        # Triton's convention: max_batch_size > 0, dims without the batch dimension
        assert config["max_batch_size"] == s.max_files == 32
        image, pixels = config["input"]
        assert (image["name"], image["data_type"], image["dims"]) == ("image", "TYPE_STRING", [1])
        assert image["reshape"] == {"shape": []} and image["optional"] is True
        assert (pixels["name"], pixels["data_type"], pixels["dims"], pixels["format"]) == (
            "pixels", "TYPE_UINT8", [1, 28, 28], "FORMAT_NCHW")
        assert pixels["optional"] is True
        assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
            ("probabilities", "TYPE_FP32", [len(LABELS)]), ("embedding", "TYPE_FP32", [256])]
        batching = config["dynamic_batching"]
        assert batching["max_queue_delay_microseconds"] == 0  # IMGREC_MAX_WAIT_MS=0: greedy
        assert batching["preferred_batch_size"] == [s.max_batch_size]
        assert batching["default_queue_policy"] == {
            "max_queue_size": s.max_queue, "timeout_action": "REJECT",
            "default_timeout_microseconds": 10_000_000, "allow_timeout_override": False}
        assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 1)]
        assert config["parameters"]["weights_sha256"] == {
            "string_value": live.service.card.weights_sha256}
        as_message(config)  # every field is ModelConfig's, with its type


def test_grpc_config_equals_the_rest_one(http: thttp.InferenceServerClient,
                                         rpc: tgrpc.InferenceServerClient) -> None:
    response = rpc.get_model_config(MODEL, "0")
    assert isinstance(response.config, mc.ModelConfig)
    assert response.config == as_message(http.get_model_config(MODEL))
    assert response.config.input[0].data_type == mc.TYPE_STRING
    assert rpc.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"] == 32


def test_metadata_shapes_are_the_batch_dimension_then_the_configs_dims(
        http: thttp.InferenceServerClient) -> None:
    """What perf_analyzer relies on: it takes each tensor's shape from the metadata and drops
    the first dimension because max_batch_size > 0."""
    config, meta = http.get_model_config(MODEL), http.get_model_metadata(MODEL)
    for key, tensors in (("input", meta["inputs"]), ("output", meta["outputs"])):
        assert {t["name"]: t["shape"] for t in tensors} == {
            c["name"]: [-1, *c["dims"]] for c in config[key]}
    assert "model_configuration" in http.get_server_metadata()["extensions"]


def test_unknown_model_or_version_is_not_found(http: thttp.InferenceServerClient,
                                               rpc: tgrpc.InferenceServerClient,
                                               live: LiveServer) -> None:
    for name, version, fragment in (("nope", "", "unknown model 'nope'"),
                                    (MODEL, "7", "unknown version '7'")):
        with pytest.raises(InferenceServerException) as e:
            http.get_model_config(name, version)
        assert e.value.status() == "404" and fragment in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            rpc.get_model_config(name, version)
        assert e.value.status() == str(grpc.StatusCode.NOT_FOUND) and fragment in \
            e.value.message()
    with httpx.Client(base_url=f"http://{live.url}") as c:
        r = c.post(f"/v2/models/{MODEL}/config")
        assert r.status_code == 405 and "use GET" in r.json()["error"]
        text = c.get("/metrics").text
    assert 'route="GET /v2/models/{name}/config",status="404"' in text


async def test_config_follows_the_settings(tiny_settings: Callable[..., Settings]) -> None:
    app = create_app(tiny_settings(embed_store="memory", warmup_batches=0, max_files=8,
                                   max_batch_size=16, max_wait_ms=2.5, max_queue=100,
                                   request_timeout_ms=750))
    async with running(app) as c:
        config = (await c.get(f"/v2/models/{MODEL}/versions/0/config")).json()
    assert config["max_batch_size"] == 8  # a request's images (IMGREC_MAX_FILES)
    batching = config["dynamic_batching"]
    # a forward pass of 16 is more than one request may carry: Triton allows no such
    # preferred size, so none is given
    assert batching["preferred_batch_size"] == []
    assert batching["max_queue_delay_microseconds"] == 2500
    assert batching["default_queue_policy"]["max_queue_size"] == 100
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 750_000
    as_message(config)


# -- perf_analyzer ---------------------------------------------------------------------------------
def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_perf_analyzer",
                                                  ROOT / "bench" / "perf_analyzer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def jpeg_bytes(seed: int) -> bytes:
    return encode(Image.open(io.BytesIO(png_bytes(seed))), "JPEG", quality=90)


@pytest.mark.slow
def test_perf_analyzer_runs_over_http_and_grpc(live: LiveServer, tmp_path: Path) -> None:
    bench = bench_module()
    pa = bench.locate()
    if pa is None:
        message = ("perf_analyzer is not set up: python bench/perf_analyzer.py --setup "
                   "(needs Debian's libb64-0d)")
        if in_ci():
            pytest.fail(f"{message}, and CI is set: ./dev setup installs it")
        pytest.skip(message)
    files = [png_bytes(900 + i) for i in range(4)] + [jpeg_bytes(950 + i) for i in range(4)]
    data = bench.write_input_data(tmp_path / "input.json", files)
    metrics_url = f"http://{live.url}/metrics"
    for protocol, url in (("http", live.url), ("grpc", live.grpc_url)):
        before = bench.infer_count(metrics_url, protocol)
        figures = bench.run_once(pa, protocol, url, MODEL, data, 2, tmp_path, window_ms=1000,
                                 stability=100, timeout_s=120)
        assert figures.infer_per_s > 0 and figures.p50_ms > 0, figures
        assert bench.infer_count(metrics_url, protocol) - before >= 8
    text = httpx.get(metrics_url).text
    ok = 'route="POST /v2/models/{name}/infer",status="200"'
    answered = [line for line in text.splitlines()
                if line.startswith("imgrec_requests_total{") and "infer" in line]
    assert all(ok in line or 'status="OK"' in line for line in answered), answered
    assert metric(text, "imgrec_rejections_total") == 0
    # every file reached the network as sent: its vector is stored under its own sha256
    ids = [hashlib.sha256(f).hexdigest() for f in files]
    r = httpx.get(f"http://{live.url}/embed", params=[("id", i) for i in ids], timeout=30)
    assert r.status_code == 200 and [x["id"] for x in r.json()["results"]] == ids
