"""The reference point: a plain FastAPI server without batching, as people usually write one.

UploadFile parsing, decode + preprocess + forward per request in Starlette's thread pool, JSON via
FastAPI. Same model directory, same decoder and the same torch thread count as imgrec, so the
comparison isolates the serving path. Run: python bench/baseline_fastapi.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.nn import load_model_dir
from app.nn.tensors import decode_image_bytes, normalize_batch


def build(model_dir: str) -> FastAPI:
    torch.set_num_threads(1)
    loaded = load_model_dir(model_dir)
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    card = loaded.card
    app = FastAPI()

    def infer(datas: list[bytes]) -> list[list[dict[str, object]]]:
        spec = card.input
        x = normalize_batch(torch.stack([decode_image_bytes(d, spec) for d in datas]), spec)
        with torch.inference_mode():
            probs = torch.softmax(model(x.contiguous(memory_format=torch.channels_last)), 1)
        top = probs.topk(5, dim=1)
        return [[{"label": card.labels[i], "index": int(i), "score": float(s)}
                 for s, i in zip(ts, ti, strict=True)]
                for ts, ti in zip(top.values, top.indices, strict=True)]

    @app.post("/predict")
    async def predict(file: list[UploadFile] = File(...)) -> dict[str, object]:
        datas = [await f.read() for f in file]
        labels = await run_in_threadpool(infer, datas)
        return {"results": [{"labels": lab} for lab in labels]}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                access_log=False, loop="uvloop", http="httptools")
