"""Command lines of the trainer: `imgrec train` and `imgrec evaluate`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from app.nn.checkpoint import load_model_dir
from app.training.config import parse_config
from app.training.data import load_data
from app.training.evaluate import evaluate


def train_main(argv: list[str] | None = None) -> int:
    from app.training.train import train

    cfg = parse_config(argv)
    train(cfg)
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imgrec evaluate",
                                description="Evaluate a model directory on a test split.")
    p.add_argument("model_dir")
    p.add_argument("--data", default=None,
                   help="'fashion-mnist', an IDX directory or an ImageFolder root "
                        "(default: the card's training data)")
    p.add_argument("--data-test", default=None, help="ImageFolder test root")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=0, help="first N test images only (0 = all)")
    args = p.parse_args(argv)
    loaded = load_model_dir(args.model_dir)
    card = loaded.card
    spec = args.data or str(card.training.get("config", {}).get("data", "fashion-mnist"))
    data = load_data(spec, args.data_test, card.input.channels)
    if data.labels != card.labels:
        print(f"error: data labels {data.labels} differ from the card's {card.labels}",
              file=sys.stderr)
        return 2
    test = data.test
    if args.limit:
        test = test.subset(torch.arange(min(args.limit, len(test))))
    device = torch.device(args.device)
    model = loaded.model.to(device).to(memory_format=torch.channels_last)
    result = evaluate(model, test, card.input, card.num_classes, device, args.batch_size)
    for name, acc in result.per_class(card.labels).items():
        print(f"{name:>12}: {acc:6.2f}%")
    claimed = card.metrics.get("test_top1")
    print(json.dumps({"model": card.name, "top1": round(result.top1, 2), "n": result.n,
                      "loss": round(result.loss, 4), "card_top1": claimed}))
    return 0
