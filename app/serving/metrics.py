"""Prometheus metrics of one service instance (a registry per app, so tests stay isolated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from app.model.card import ModelCard

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imgrec_requests",
                                "requests by route (HTTP path or gRPC method) and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("imgrec_request_seconds", "request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("imgrec_images", "images answered by route", ["route"], registry=r)
        self.queue_depth = Gauge("imgrec_queue_depth", "images waiting for the network",
                                 registry=r)
        # the queue's bound (IMGREC_MAX_QUEUE), so that dashboards and alerts read depth/capacity
        self.queue_capacity = Gauge("imgrec_queue_capacity", "images the queue holds before "
                                    "503 (IMGREC_MAX_QUEUE)", registry=r)
        self.batch_size = Histogram("imgrec_batch_size", "images per forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.rejections = Counter("imgrec_rejections", "requests refused, by reason",
                                  ["reason"], registry=r)
        self.decode_seconds = Histogram("imgrec_decode_seconds",
                                        "decode + preprocess time per image",
                                        buckets=FAST_BUCKETS, registry=r)
        self.inference_seconds = Histogram("imgrec_inference_seconds",
                                           "forward pass time per batch",
                                           buckets=FAST_BUCKETS, registry=r)
        self.store_write_seconds = Histogram("imgrec_store_write_seconds",
                                             "embedding-store write time per batch",
                                             buckets=FAST_BUCKETS, registry=r)
        self.ready = Gauge("imgrec_ready", "1 when ready to serve", registry=r)
        # Prometheus's info-metric idiom: 1 with the served model as labels (one label set)
        self.model_info = Gauge("imgrec_model_info", "the served model: 1, with its name, "
                                "version and weights sha256 as labels",
                                ["name", "version", "weights_sha256"], registry=r)
        # model updates (app/serving/model_swap.py): switched, unchanged, or failed (the
        # served model goes on; one log line says why)
        self.model_reloads = Counter("imgrec_model_reloads", "model reloads (SIGHUP, or the "
                                     "model directory changed), by outcome", ["outcome"],
                                     registry=r)
        # the embedding store's outages (app/serving/store/guard.py)
        self.store_up = Gauge("imgrec_store_up", "1 while the embedding store takes writes, "
                              "0 during an outage", registry=r)
        self.store_unstored = Counter("imgrec_store_unstored_images", "vectors computed but "
                                      "not stored (store unavailable); their requests were "
                                      "answered", registry=r)
        self.store_errors = Counter("imgrec_store_errors", "failed embedding-store calls, by "
                                    "operation (put, get, count, open, probe)", ["op"],
                                    registry=r)
        self.store_outages = Counter("imgrec_store_outages", "embedding-store outages begun",
                                     registry=r)

    def serving(self, card: ModelCard, queue_capacity: int) -> None:
        """What this instance serves, set when the Service becomes ready (again at a model
        switch: the previous model's label set goes)."""
        self.model_info.clear()
        self.model_info.labels(card.name, card.version, card.weights_sha256).set(1)
        self.queue_capacity.set(queue_capacity)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
