"""The offline trainer (claims 6-12), top to bottom as one story.

    imgrec train --out models/fashion-mnist                  # one process
    torchrun --nproc_per_node 4 -m app.training --out ...     # DDP, one process per device

Load data and hold out a validation split -> build the network from a preset -> train with the
patent's augmentation and loss until the convergence condition holds, keeping the best weights ->
evaluate the best weights on the test split -> write the model directory (rank 0 only).

``train`` tells the story; each step below it is one function, in the order it runs.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from app.model.card import InputSpec, ModelCard
from app.nn.checkpoint import load_model_dir, save_model_dir
from app.nn.resnet import PatentResNet, create_model, preset_config
from app.nn.tensors import normalize_batch
from app.training.augment import build_train_transform
from app.training.config import TrainConfig
from app.training.convergence import Convergence
from app.training.data import ImageDataset, Split, load_data, split_holdout
from app.training.evaluate import EvalResult, autocast_for, evaluate
from app.training.loss import LossTerms, PatentLoss
from app.training.plots import plot_confusion, plot_curves
from app.training.provenance import JsonlLog, command_line, git_commit, hardware
from app.training.runtime import (
    Runtime,
    finish_runtime,
    rank_digests,
    seed_everything,
    setup_runtime,
    sync_bn_statistics,
)

LOSS_TERMS = ("task", "weight_decay", "bn", "total")


def train(cfg: TrainConfig) -> Path:
    started = time.time()
    rt = setup_runtime(cfg)
    seed_everything(cfg.seed)
    out = Path(cfg.out)

    data = build_data(cfg, rt)
    run = build_run(cfg, rt, data)
    start_epoch = resume(cfg.state_path, run, announce=rt.main) if cfg.resume else 0
    log = open_log(cfg, rt, out, data, run, start_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        if run.stop.done:
            break
        record = run_epoch(cfg, rt, data, run, epoch)
        log.write(event="epoch", **record)
        if rt.main:
            print_epoch(record)
            save_state(cfg.state_path, run, epoch)

    run.model.load_state_dict(run.best_state)
    digests = rank_digests(run.model, rt)  # every rank must hold the same network
    if rt.main:
        write_model_dir(cfg, rt, data, run, out, digests, started, log)
    finish_runtime(rt)
    return out


# -- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    """The splits, the input they are prepared to, and the training split's loader."""

    labels: list[str]
    source: str
    fingerprint: dict[str, str]
    train: Split
    val: Split
    test: Split
    spec: InputSpec
    loader: DataLoader[tuple[Tensor, int]]
    sampler: DistributedSampler[Any] | None


def build_data(cfg: TrainConfig, rt: Runtime) -> Data:
    """Load the data, hold out the validation split (claim 6), apply ``--limit-*``, and load the
    training split with the patent's augmentation (claims 10-12), one shard per DDP rank."""
    arch = preset_config(cfg.preset, **cfg.arch)
    bundle = load_data(cfg.data, cfg.data_test, arch.in_channels)
    train_split, val_split = split_holdout(bundle.train, cfg.val_fraction, cfg.seed)
    train_split, test_split = _first(train_split, cfg.limit_train), _first(bundle.test,
                                                                         cfg.limit_test)
    size = cfg.input_size or arch.input_size
    spec = InputSpec(size=size, channels=bundle.channels, mean=bundle.mean, std=bundle.std,
                     resize=cfg.resize)
    train_ds = ImageDataset(train_split, spec, build_train_transform(cfg, size, bundle.channels))
    sampler: DistributedSampler[Any] | None = None
    if rt.world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.workers, drop_last=True, persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed), pin_memory=rt.device.type == "cuda",
    )
    return Data(labels=bundle.labels, source=bundle.source, fingerprint=bundle.fingerprint,
                train=train_split, val=val_split, test=test_split, spec=spec, loader=loader,
                sampler=sampler)


def _first(split: Split, limit: int) -> Split:
    """The split's first ``limit`` images (all of them for 0)."""
    return split.subset(torch.arange(min(limit, len(split)))) if limit else split


# -- network, loss, optimiser --------------------------------------------------------------------
@dataclass
class Run:
    """The network and what trains it, and what the loop carries from epoch to epoch: what
    ``save_state`` writes and ``resume`` reads back."""

    model: PatentResNet
    net: nn.Module  # the model, or its DDP wrapper
    criterion: PatentLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stop: Convergence
    amp: bool
    parent: dict[str, Any] | None  # the --init-from directory's lineage
    best_state: dict[str, Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def build_run(cfg: TrainConfig, rt: Runtime, data: Data) -> Run:
    """The network from its preset (claims 1-5), or fine-tuned from a model directory; the
    patent's loss (claims 7-9); SGD with warm-up and cosine decay; the convergence test."""
    model: PatentResNet = create_model(cfg.preset, len(data.labels), **cfg.arch)
    parent = init_from(model, cfg.init_from, data.labels) if cfg.init_from else None
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    net: nn.Module = DistributedDataParallel(model) if rt.world > 1 else model
    criterion = PatentLoss(cfg.weight_decay, cfg.bn_reg, cfg.label_smoothing)
    lr = cfg.lr * cfg.batch_size * rt.world / 128
    # Weight decay and the BN regulariser are explicit loss terms (claims 7-9), not optimiser
    # decay, so each can be logged and the BN term has its own coefficient.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(data.loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_schedule(s, total_steps, warmup))
    return Run(
        model=model, net=net, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
        stop=Convergence(cfg.patience, cfg.rel_tol, cfg.epochs),
        amp=cfg.amp == "bf16" or (cfg.amp == "auto" and rt.device.type == "cuda"),
        parent=parent, best_state={k: v.clone() for k, v in model.state_dict().items()})


def init_from(model: PatentResNet, directory: str, labels: list[str]) -> dict[str, Any]:
    """Load a trained model directory's weights to fine-tune from; returns its lineage."""
    parent = load_model_dir(directory)
    if parent.card.labels != labels:
        raise ValueError(f"--init-from {directory}: its labels differ from the data's")
    if parent.model.config != model.config:
        raise ValueError(f"--init-from {directory}: its architecture differs from --preset/--arch")
    model.load_state_dict(parent.model.state_dict())
    return {"path": str(directory), "weights_sha256": parent.card.weights_sha256,
            "command": parent.card.training.get("command"),
            "test_top1": parent.card.metrics.get("test_top1"),
            "epochs_run": parent.card.metrics.get("epochs_run")}


def lr_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero: a multiplier on the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- the training state: save_state after every epoch, resume from it ---------------------------
def save_state(path: Path, run: Run, epoch: int) -> None:
    """Everything ``resume`` needs to go on after ``epoch``, loadable with
    torch.load(weights_only=True); kept apart from the published weights."""
    version, internal, _ = random.getstate()
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "convergence": run.stop.state_dict(),
        "best_model": run.best_state, "history": json.dumps(run.history), "epoch": epoch,
        "rng_torch": torch.get_rng_state(), "rng_python": json.dumps(list(internal)),
        "rng_python_version": version,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume(path: Path, run: Run, announce: bool) -> int:
    """Load what ``save_state`` wrote into ``run``; returns the first epoch still to train (0,
    a fresh start, when there is no state file yet)."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.stop.load_state_dict(state["convergence"])
    run.best_state = state["best_model"]
    run.history = json.loads(state["history"])
    start_epoch = int(state["epoch"]) + 1
    torch.set_rng_state(state["rng_torch"])
    random.setstate((int(state["rng_python_version"]),
                     tuple(json.loads(state["rng_python"])), None))
    if announce:
        print(f"resumed from {path} at epoch {start_epoch}", file=sys.stderr)
    return start_epoch


def open_log(cfg: TrainConfig, rt: Runtime, out: Path, data: Data, run: Run,
             start_epoch: int) -> JsonlLog:
    """Rank 0's train_log.jsonl in the output directory: begun afresh by a new run, continued
    by a resumed one. Other ranks log nothing."""
    if not rt.main:
        return JsonlLog(None)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "train_log.jsonl")
    if start_epoch == 0:
        (out / "train_log.jsonl").unlink(missing_ok=True)
        log.write(event="start", config=cfg.model_dump(), world_size=rt.world,
                  train=len(data.train), val=len(data.val), test=len(data.test),
                  parameters=sum(p.numel() for p in run.model.parameters()))
    return log


# -- one epoch -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """An epoch's training batches so far: loss terms summed per image, and top-1 hits."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    correct: int = 0
    seen: int = 0

    def add(self, terms: LossTerms, logits: Tensor, y: Tensor) -> None:
        n = len(y)
        self.seen += n
        self.correct += int((logits.detach().argmax(1) == y).sum())
        for key in self.sums:
            self.sums[key] += getattr(terms, key).item() * n

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.seen, 1)


def run_epoch(cfg: TrainConfig, rt: Runtime, data: Data, run: Run, epoch: int
              ) -> dict[str, Any]:
    """Train one epoch, then judge it on the validation split (claim 6), keeping the weights
    when they are the best so far; returns the epoch's record, which joins ``run.history``."""
    t0 = time.time()
    tally = train_epoch(cfg, rt, data, run, epoch)
    train_time = time.time() - t0
    if rt.world > 1:
        sync_bn_statistics(run.model, rt.world)
    val = evaluate(run.model, data.val, data.spec, len(data.labels), rt.device, amp=run.amp)
    improved = run.stop.update(epoch, val.loss)
    if improved:
        run.best_state = {k: v.detach().clone().cpu() for k, v in run.model.state_dict().items()}
    record = {
        "epoch": epoch, "lr": run.scheduler.get_last_lr()[0],
        "train_loss": tally.mean("task"),
        "train_weight_decay": tally.mean("weight_decay"),
        "train_bn_reg": tally.mean("bn"),
        "train_total": tally.mean("total"),
        "train_acc": 100 * tally.correct / max(tally.seen, 1),
        "val_loss": val.loss, "val_acc": val.top1, "best": improved,
        "images_per_s": tally.seen * rt.world / max(train_time, 1e-9),
        "epoch_s": time.time() - t0,
    }
    run.history.append(record)
    return record


def train_epoch(cfg: TrainConfig, rt: Runtime, data: Data, run: Run, epoch: int) -> Tally:
    """One pass over this rank's shard of the training split: forward, the patent's loss,
    backward, one optimiser and schedule step per batch."""
    if data.sampler is not None:
        data.sampler.set_epoch(epoch)
    run.net.train()
    t0 = time.time()
    tally = Tally()
    shown = rt.main and cfg.progress
    bar = tqdm(data.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not shown, leave=False, dynamic_ncols=True)
    for images, labels in bar:
        x = normalize_batch(images, data.spec).to(rt.device, non_blocking=True,
                                                  memory_format=torch.channels_last)
        y = labels.to(rt.device, non_blocking=True)
        with autocast_for(rt.device, run.amp):
            logits = run.net(x)
        terms = run.criterion(run.model, logits, y)
        run.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        run.optimizer.step()
        run.scheduler.step()
        tally.add(terms, logits, y)
        if shown:
            rate = tally.seen * rt.world / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{tally.sums['task'] / tally.seen:.3f}",
                            acc=f"{100 * tally.correct / tally.seen:.1f}", img_s=f"{rate:.0f}")
    bar.close()
    return tally


def print_epoch(record: dict[str, Any]) -> None:
    print(f"epoch {record['epoch'] + 1}: task {record['train_loss']:.4f} wd "
          f"{record['train_weight_decay']:.4f} bn {record['train_bn_reg']:.2e} | val "
          f"loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}%"
          f"{' *' if record['best'] else ''} | {record['images_per_s']:.0f} img/s",
          file=sys.stderr, flush=True)


# -- judge the best weights on the test split, write the model directory -----------------------
def write_model_dir(cfg: TrainConfig, rt: Runtime, data: Data, run: Run, out: Path,
                    digests: list[str], started: float, log: JsonlLog) -> None:
    """Rank 0, with the best weights loaded: their test figures, then the model directory:
    weights and card, the plots, MODEL_CARD.md, and the inference graph the CPU server runs
    without importing PyTorch."""
    test = evaluate(run.model, data.test, data.spec, len(data.labels), rt.device, amp=run.amp)
    wall = time.time() - started
    card = model_card(cfg, rt, data, run, test, out, digests, wall)
    if run.history:
        plot_curves(run.history, out / "curves.png")
    plot_confusion(test.confusion, data.labels, out / "confusion.png",
                   f"{card.name}: test top-1 {test.top1:.2f}% (n={test.n})")
    extra = "## Plots\n\n![curves](curves.png)\n\n![confusion](confusion.png)\n"
    save_model_dir(run.model, card, out, extra_markdown=extra)
    from app.nn.export import export_model_dir

    export_model_dir(out)  # model.onnx, recorded in the card
    if cfg.calibrate:  # on the same data and validation split (the card records both)
        from app.training.calibrate import calibrate_main

        calibrate_main([str(out), "--threads", str(cfg.threads)])
    reason = run.stop.reason or "stopped"
    log.write(event="done", test_top1=test.top1, stop_reason=reason, wall_time_s=wall)
    print(f"test top-1 {test.top1:.2f}% on {test.n} images; {reason}; wrote {out}",
          file=sys.stderr)


def model_card(cfg: TrainConfig, rt: Runtime, data: Data, run: Run, test: EvalResult,
               out: Path, digests: list[str], wall: float) -> ModelCard:
    """The card: the network, its input and labels, its test figures, and how it was made
    (config, exact command, commit, hardware, data fingerprint)."""
    history, stop, model = run.history, run.stop, run.model
    metrics = {
        "test_top1": round(test.top1, 2), "test_loss": round(test.loss, 4),
        "test_images": test.n, "best_val_loss": round(stop.best, 4),
        "best_val_top1": round(max(h["val_acc"] for h in history), 2) if history else 0.0,
        "best_epoch": stop.best_epoch + 1, "epochs_run": len(history),
        "stop_reason": stop.reason or "stopped",
        "per_class_accuracy": test.per_class(data.labels),
        "confusion_matrix": test.confusion.tolist(),
    }
    return ModelCard(
        name=cfg.name or out.name, preset=cfg.preset, arch=model.config.to_dict(),
        labels=data.labels, input=data.spec, embedding_dim=model.embedding_dim,
        description=f"Pre-activation bottleneck ResNet (patent claims 1-5), preset "
                    f"`{cfg.preset}`, trained by imgrec's trainer on {data.source}.",
        metrics=metrics,
        training={
            "config": cfg.model_dump(), "command": command_line(), "git_commit": git_commit(),
            "wall_time_s": round(wall, 1), "hardware": hardware(rt),
            "rank_state_digests": digests,
            "init_from": run.parent,
            "images_per_s": round(sum(h["images_per_s"] for h in history)
                                  / max(len(history), 1), 1),
        },
        data={"source": data.source, "fingerprint": data.fingerprint,
              "train": len(data.train), "val": len(data.val), "test": len(data.test)},
    )
