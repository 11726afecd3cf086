"""A model update with no request lost: the served model, and how it is replaced.

Triggers: SIGHUP (app/main.py), and a change of the model directory seen by polling every
``IMGREC_MODEL_WATCH_INTERVAL_S``: of the directory ``IMGREC_MODEL_DIR`` resolves to (a symlink
switched atomically) or of its card.json's bytes. No endpoint triggers one: a model is loaded
on the operator's word only.

A reload resolves the directory once and loads it from there, beside the served model: the card
and the sha256 of every file it vouches for (app/model/directory.py), the graph checks the
Predictor does, then a warm-up that also checks the outputs' shapes against the card. All of it
runs on a worker thread of its own, never on the inference thread, so batches keep running
meanwhile. Only then does it switch: one assignment on the event loop, between two batches.

Why nothing is lost or mislabelled: a request takes the served model once, when it starts
(``current``), and keeps it: its images are decoded to that model's input, queued with it, run
by it (the Service splits a batch by model, so no forward pass mixes two), stored under its key
and answered in its name. Requests begun before the switch finish on the old model, which goes
when the last of them is answered; readiness never changes. A directory that fails any step
leaves the served model as it was, with one log line and ``imgrec_model_reloads_total
{outcome="failed"}``; the watcher does not retry that same directory and card until one of them
changes again (SIGHUP always retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from app.model.directory import CARD_FILE, ModelDirError
from app.serving.metrics import Metrics
from app.serving.predictor import Predictor
from app.settings import Settings

log = logging.getLogger("imgrec.model")

SWITCHED, UNCHANGED, FAILED, IGNORED = "switched", "unchanged", "failed", "ignored"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What the watcher compares: where the model directory leads, and its card's bytes."""

    directory: Path  # IMGREC_MODEL_DIR with every symlink resolved
    card_sha256: str | None  # None when card.json cannot be read


def fingerprint(model_dir: Path) -> Fingerprint:
    resolved = Path(os.path.realpath(model_dir))
    try:
        digest: str | None = hashlib.sha256((resolved / CARD_FILE).read_bytes()).hexdigest()
    except OSError:
        digest = None
    return Fingerprint(resolved, digest)


def one_line(error: BaseException) -> str:
    """An exception as one line: a ModelDirError's message names the file and the remedy."""
    text = " ".join(str(error).split())
    if isinstance(error, ModelDirError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def describe(model: Predictor) -> str:
    return f"{model.card.name} {model.card.version} ({model.model_key[:12]})"


class ModelSwap:
    """Holds the served model (``current``); ``reload`` replaces it, ``watch`` polls for a new
    one. Used from the event loop only."""

    def __init__(self, settings: Settings, metrics: Metrics,
                 loader: Callable[[Settings], Predictor]) -> None:
        self.settings = settings
        self.metrics = metrics
        self._loader = loader
        self.current: Predictor | None = None
        self._served: Fingerprint | None = None
        self._refused: Fingerprint | None = None  # the watcher does not retry it
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        for outcome in (SWITCHED, UNCHANGED, FAILED):  # every series exists from the start
            metrics.model_reloads.labels(outcome)

    def _load(self, where: Fingerprint) -> Predictor:
        """The predictor of the resolved directory: a symlink switched again meanwhile cannot
        mix the files of two directories."""
        return self._loader(self.settings.model_copy(update={"model_dir": where.directory}))

    async def load_first(self) -> Predictor:
        """The model served from start-up (warmed up by the Service on the inference thread)."""
        where = await asyncio.to_thread(fingerprint, self.settings.model_dir)
        model = await asyncio.to_thread(self._load, where)
        self._serve(model, where)
        return model

    def _serve(self, model: Predictor, where: Fingerprint) -> None:
        self.current, self._served, self._refused = model, where, None

    def _load_and_warm(self, where: Fingerprint) -> Predictor:
        """On a worker thread: load, verify and warm up; any failure raises."""
        model = self._load(where)
        model.warm_up(self.settings.warmup_batches, self.settings.max_batch_size)
        return model

    async def reload(self, trigger: str) -> str:
        """Load what IMGREC_MODEL_DIR leads to now and switch to it: SWITCHED, UNCHANGED (it
        is the served directory and card) or FAILED (the served model goes on)."""
        async with self._lock:  # one reload at a time; a second trigger then finds it done
            old = self.current
            if old is None:
                return IGNORED
            where = await asyncio.to_thread(fingerprint, self.settings.model_dir)
            if where == self._served:
                self.metrics.model_reloads.labels(UNCHANGED).inc()
                log.info("model reload (%s): %s is already served from %s", trigger,
                         describe(old), where.directory)
                return UNCHANGED
            started = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._load_and_warm, where)
            except Exception as e:  # anything: the served model must go on
                self._refused = where
                self.metrics.model_reloads.labels(FAILED).inc()
                log.error("model reload (%s) refused, still serving %s: %s", trigger,
                          describe(old), one_line(e))
                log.debug("the refused model's traceback", exc_info=True)
                return FAILED
            self._serve(new, where)  # the switch: requests from now on take the new model
            self.metrics.serving(new.card, self.settings.max_queue)
            self.metrics.model_reloads.labels(SWITCHED).inc()
            log.info("model switched (%s): %s -> %s from %s, loaded and warmed up in %.2f s; "
                     "vectors are keyed by model: re-index catalogues with `imgrec index`",
                     trigger, describe(old), describe(new), where.directory,
                     time.perf_counter() - started)
            return SWITCHED

    # -- the watcher -------------------------------------------------------------------------
    def watch(self, on_change: Callable[[str], Awaitable[object]]) -> None:
        """Poll the model directory every IMGREC_MODEL_WATCH_INTERVAL_S (0: never) and call
        ``on_change`` when it leads to another directory or card than the served one."""
        interval = self.settings.model_watch_interval_s
        if interval > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(interval, on_change), name="model-watch")

    async def _watch(self, interval: float, on_change: Callable[[str], Awaitable[object]]
                     ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(on_change)
            except Exception:  # the watcher must outlive any one failure
                log.exception("model directory watch failed; trying again in %g s", interval)

    async def check(self, on_change: Callable[[str], Awaitable[object]]) -> bool:
        """One poll: call ``on_change`` (and say True) when the model directory leads to
        another directory or card than the served one, and not to the one last refused."""
        where = await asyncio.to_thread(fingerprint, self.settings.model_dir)
        if where in (self._served, self._refused):
            return False
        await on_change(f"{self.settings.model_dir} changed")
        return True

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
