"""The offline trainer (claims 6-12), top to bottom as one story.

    imgrec train --out models/fashion-mnist                  # one process
    torchrun --nproc_per_node 4 -m app.training --out ...     # DDP, one process per device

Load data and hold out a validation split -> build the network from a preset -> train with the
patent's augmentation and loss until the convergence condition holds, keeping the best weights ->
evaluate the best weights on the test split -> write the model directory (rank 0 only).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
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
from app.training.data import DataBundle, ImageDataset, load_data, split_holdout
from app.training.evaluate import autocast_for, evaluate
from app.training.loss import PatentLoss
from app.training.plots import plot_confusion, plot_curves


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Single process, or DDP under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero: a multiplier on the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def hardware(rt: Runtime) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(rt.device), "world_size": rt.world, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if rt.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt.device)
    return info


def command_line() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')} "
        return prefix + shlex.join(["-m", "app.training", *sys.argv[1:]])
    args = sys.argv[1:]
    if args[:1] == ["train"]:  # run as `imgrec train ...` rather than `python -m app.training`
        args = args[1:]
    return shlex.join(["imgrec", "train", *args])


def state_digest(model: nn.Module) -> str:
    """A hash of the exact weights and buffers: equal across ranks when DDP kept them in sync."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class JsonlLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> Path:
    started = time.time()
    rt = setup_runtime(cfg)
    seed_everything(cfg.seed)
    out = Path(cfg.out)

    # -- data --------------------------------------------------------------------------------
    arch = preset_config(cfg.preset, **cfg.arch)
    data: DataBundle = load_data(cfg.data, cfg.data_test, arch.in_channels)
    train_split, val_split = split_holdout(data.train, cfg.val_fraction, cfg.seed)
    test_split = data.test
    if cfg.limit_train:
        train_split = train_split.subset(torch.arange(min(cfg.limit_train, len(train_split))))
    if cfg.limit_test:
        test_split = test_split.subset(torch.arange(min(cfg.limit_test, len(test_split))))
    size = cfg.input_size or arch.input_size
    spec = InputSpec(size=size, channels=data.channels, mean=data.mean, std=data.std,
                     resize=cfg.resize)
    train_ds = ImageDataset(train_split, spec, build_train_transform(cfg, size, data.channels))
    sampler: DistributedSampler[Any] | None = None
    if rt.world > 1:
        sampler = DistributedSampler(train_ds, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.workers, drop_last=True, persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed), pin_memory=rt.device.type == "cuda",
    )

    # -- network, loss, optimiser ------------------------------------------------------------
    model: PatentResNet = create_model(cfg.preset, len(data.labels), **cfg.arch)
    parent = init_from(model, cfg.init_from, data.labels) if cfg.init_from else None
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    net: nn.Module = DistributedDataParallel(model) if rt.world > 1 else model
    criterion = PatentLoss(cfg.weight_decay, cfg.bn_reg, cfg.label_smoothing)
    lr = cfg.lr * cfg.batch_size * rt.world / 128
    # Weight decay and the BN regulariser are explicit loss terms (claims 7-9), not optimiser
    # decay, so each can be logged and the BN term has its own coefficient.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_schedule(s, total_steps, warmup))
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and rt.device.type == "cuda")
    stop = Convergence(cfg.patience, cfg.rel_tol, cfg.epochs)
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] = {k: v.clone() for k, v in model.state_dict().items()}
    start_epoch = 0

    if cfg.resume and cfg.state_path.is_file():
        state = torch.load(cfg.state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stop.load_state_dict(state["convergence"])
        best_state = state["best_model"]
        history = json.loads(state["history"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng_torch"])
        random.setstate((int(state["rng_python_version"]),
                         tuple(json.loads(state["rng_python"])), None))
        if rt.main:
            print(f"resumed from {cfg.state_path} at epoch {start_epoch}", file=sys.stderr)

    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "train_log.jsonl" if rt.main else None)
    if rt.main and start_epoch == 0:
        (out / "train_log.jsonl").unlink(missing_ok=True)
        log.write(event="start", config=cfg.model_dump(), world_size=rt.world,
                  train=len(train_split), val=len(val_split), test=len(test_split),
                  parameters=sum(p.numel() for p in model.parameters()))

    # -- the loop ------------------------------------------------------------------------------
    epoch = start_epoch
    while epoch < cfg.epochs and not stop.done:
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t0 = time.time()
        sums = {"task": 0.0, "weight_decay": 0.0, "bn": 0.0, "total": 0.0}
        correct = seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (rt.main and cfg.progress), leave=False, dynamic_ncols=True)
        for images, labels in bar:
            x = normalize_batch(images, spec).to(rt.device, non_blocking=True,
                                                 memory_format=torch.channels_last)
            y = labels.to(rt.device, non_blocking=True)
            with autocast_for(rt.device, amp):
                logits = net(x)
            terms = criterion(model, logits, y)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            scheduler.step()
            n = len(y)
            seen += n
            correct += int((logits.detach().argmax(1) == y).sum())
            for key in sums:
                sums[key] += getattr(terms, key).item() * n
            if rt.main and cfg.progress:
                rate = seen * rt.world / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{sums['task'] / seen:.3f}",
                                acc=f"{100 * correct / seen:.1f}", img_s=f"{rate:.0f}")
        bar.close()
        train_time = time.time() - t0
        if rt.world > 1:
            sync_bn_statistics(model, rt.world)
        val = evaluate(model, val_split, spec, len(data.labels), rt.device, amp=amp)
        improved = stop.update(epoch, val.loss)
        if improved:
            best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        record = {
            "epoch": epoch, "lr": scheduler.get_last_lr()[0],
            "train_loss": sums["task"] / max(seen, 1),
            "train_weight_decay": sums["weight_decay"] / max(seen, 1),
            "train_bn_reg": sums["bn"] / max(seen, 1),
            "train_total": sums["total"] / max(seen, 1),
            "train_acc": 100 * correct / max(seen, 1),
            "val_loss": val.loss, "val_acc": val.top1, "best": improved,
            "images_per_s": seen * rt.world / max(train_time, 1e-9),
            "epoch_s": time.time() - t0,
        }
        history.append(record)
        log.write(event="epoch", **record)
        if rt.main:
            print(f"epoch {epoch + 1}: task {record['train_loss']:.4f} wd "
                  f"{record['train_weight_decay']:.4f} bn {record['train_bn_reg']:.2e} | val "
                  f"loss {val.loss:.4f} acc {val.top1:.2f}%{' *' if improved else ''} | "
                  f"{record['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
            save_training_state(cfg.state_path, model, optimizer, scheduler, stop, best_state,
                                history, epoch)
        epoch += 1

    # -- judge the best weights on the test split, write the model directory -------------------
    reason = stop.reason or "stopped"
    model.load_state_dict(best_state)
    digests: list[str] = [state_digest(model)]
    if rt.world > 1:
        gathered: list[Any] = [None] * rt.world
        dist.all_gather_object(gathered, digests[0])
        digests = [str(d) for d in gathered]
    result_dir = out
    if rt.main:
        test = evaluate(model, test_split, spec, len(data.labels), rt.device, amp=amp)
        wall = time.time() - started
        metrics = {
            "test_top1": round(test.top1, 2), "test_loss": round(test.loss, 4),
            "test_images": test.n, "best_val_loss": round(stop.best, 4),
            "best_val_top1": round(max(h["val_acc"] for h in history), 2) if history else 0.0,
            "best_epoch": stop.best_epoch + 1, "epochs_run": len(history), "stop_reason": reason,
            "per_class_accuracy": test.per_class(data.labels),
            "confusion_matrix": test.confusion.tolist(),
        }
        card = ModelCard(
            name=cfg.name or out.name, preset=cfg.preset, arch=model.config.to_dict(),
            labels=data.labels, input=spec, embedding_dim=model.embedding_dim,
            description=f"Pre-activation bottleneck ResNet (patent claims 1-5), preset "
                        f"`{cfg.preset}`, trained by imgrec's trainer on {data.source}.",
            metrics=metrics,
            training={
                "config": cfg.model_dump(), "command": command_line(), "git_commit": git_commit(),
                "wall_time_s": round(wall, 1), "hardware": hardware(rt),
                "rank_state_digests": digests,
                "init_from": parent,
                "images_per_s": round(sum(h["images_per_s"] for h in history)
                                      / max(len(history), 1), 1),
            },
            data={"source": data.source, "fingerprint": data.fingerprint,
                  "train": len(train_split), "val": len(val_split), "test": len(test_split)},
        )
        if history:
            plot_curves(history, out / "curves.png")
        plot_confusion(test.confusion, data.labels, out / "confusion.png",
                       f"{card.name}: test top-1 {test.top1:.2f}% (n={test.n})")
        extra = "## Plots\n\n![curves](curves.png)\n\n![confusion](confusion.png)\n"
        save_model_dir(model, card, out, extra_markdown=extra)
        # the inference graph (model.onnx), recorded in the card: the CPU server runs it
        # without importing PyTorch
        from app.nn.export import export_model_dir

        export_model_dir(out)
        log.write(event="done", test_top1=test.top1, stop_reason=reason, wall_time_s=wall)
        print(f"test top-1 {test.top1:.2f}% on {test.n} images; {reason}; wrote {out}",
              file=sys.stderr)
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result_dir


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


def sync_bn_statistics(model: nn.Module, world: int) -> None:
    """Average BN running statistics over ranks. DDP keeps parameters identical, but each rank
    updates its running stats from its own shard in every forward; without this the ranks would
    evaluate (and so decide convergence) on different networks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, stop: Convergence,
                        best_state: dict[str, torch.Tensor], history: list[dict[str, Any]],
                        epoch: int) -> None:
    """Everything --resume needs, loadable with torch.load(weights_only=True); kept apart from
    the published weights."""
    version, internal, _ = random.getstate()
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "convergence": stop.state_dict(),
        "best_model": best_state, "history": json.dumps(history), "epoch": epoch,
        "rng_torch": torch.get_rng_state(), "rng_python": json.dumps(list(internal)),
        "rng_python_version": version,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
