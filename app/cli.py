"""`imgrec` command line: train, evaluate, export, quantize, serve, index."""

from __future__ import annotations

import os
import sys

USAGE = """usage: imgrec {train,evaluate,export,quantize,calibrate,serve,index} [options]

  train      train the network and write a model directory (imgrec train --help)
  evaluate   evaluate a model directory on a test split (imgrec evaluate --help)
  export     write a model directory's inference graph, model.onnx (imgrec export --help)
  quantize   write and measure a static int8 graph, model.int8.onnx (imgrec quantize --help)
  calibrate  fit calibrated scores and the unknown threshold into the card (--help)
  serve      serve a model directory over HTTP (imgrec serve --help)
  index      embed a catalogue into the embedding store, here or on Ray (imgrec index --help)
"""


# The modules each extra brings (pyproject.toml), and the extra to install when one is missing:
# a plain `pip install imgrec` serves and indexes, and nothing more.
EXTRAS = {"torch": "gpu", "safetensors": "gpu", "onnx": "export", "onnxscript": "export",
          "torchvision": "train", "matplotlib": "train"}
NEEDS = {"train": "train", "evaluate": "train", "export": "export", "quantize": "export",
         "calibrate": "train"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        return _run(command, rest)
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS or command not in NEEDS:
            raise
        extra = NEEDS[command]
        print(f"imgrec {command}: needs PyTorch and the rest of the {extra} extra, which this "
              f"installation lacks (no module named {top!r}): pip install 'imgrec[{extra}]'",
              file=sys.stderr)
        return 1


def _run(command: str, rest: list[str]) -> int:
    if command == "train":
        from app.training.cli import train_main

        return train_main(rest)
    if command == "evaluate":
        from app.training.cli import evaluate_main

        return evaluate_main(rest)
    if command == "export":
        from app.nn.export import export_main

        return export_main(rest)
    if command == "quantize":
        from app.training.quantize_cli import quantize_main

        return quantize_main(rest)
    if command == "calibrate":
        from app.training.calibrate import calibrate_main

        return calibrate_main(rest)
    if command == "serve":
        # The server's own numpy matrix products are small (a batch's unknown scores: 32 x 512
        # by 512 x 512); OpenBLAS's threads for them contend with ONNX Runtime's and the HTTP
        # side's: measured on a loaded 2-core machine, 40.6 ms per batch with two threads
        # against 2.0 ms with one. Set before numpy loads; the environment still decides.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from app.serve.cli import serve_main

        return serve_main(rest)
    if command == "index":
        from app.serving.bulk_index import index_main

        return index_main(rest)
    print(f"imgrec: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
