"""`python -m app.training ...` / `torchrun --nproc_per_node N -m app.training ...`."""

from app.training.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
