"""atheris fuzzing of imgrec's two parsers of untrusted bytes, for as long as you like:

    python fuzz/run.py multipart --minutes 5    # the streaming multipart parser
    python fuzz/run.py decode --minutes 5       # the image decode path (header checks, Pillow)

(atheris: ``pip install -e '.[fuzz]'``.) The corpus grows in ``fuzz/work/<target>/`` (seeded
from fuzz/corpus.py on the first run); a finding is written to ``fuzz/findings/`` as
``crash-*`` / ``timeout-*`` and the run stops: replay it with
``python fuzz/run.py decode fuzz/findings/crash-...``, fix it and add it as a regression test
to tests/api/test_fuzz_properties.py. An input that takes over 10 s is a finding (a hang).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# coverage feedback from the parsers themselves, not from torch, numpy or FastAPI
with atheris.instrument_imports(include=["app.api.multipart", "app.serving.upload_checks",
                                         "python_multipart", "PIL", "fuzz.targets"]):
    import python_multipart  # noqa: F401  (instrumented: coverage guides the fuzzer inside it)

    from app.api import multipart as _multipart  # noqa: F401
    from app.serving import images as _images  # noqa: F401
    from fuzz import targets

from fuzz import corpus  # noqa: E402


def multipart_input(data: bytes) -> None:
    """First byte: the chunk size the body arrives in (1-64 bytes, or all at once); second byte's
    low bit: whether Content-Length is sent; the rest: the body."""
    if len(data) < 2:
        return
    chunk = data[0] % 65 or 1 << 20
    targets.multipart(data[2:], chunk=chunk, content_length=bool(data[1] & 1))


def decode_input(data: bytes) -> None:
    """First byte's low bit: grey 28x28 or RGB 32x32 input; the rest: the file."""
    if not data:
        return
    targets.decode(data[1:], targets.SPECS[data[0] & 1])


TARGETS = {
    "multipart": (multipart_input,
                  lambda: {k: b"\x07\x01" + v for k, v in corpus.bodies().items()}),
    "decode": (decode_input, lambda: {k: b"\x01" + v for k, v in corpus.images().items()}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz (default 5)")
    p.add_argument("inputs", nargs="*", help="replay these files instead of fuzzing")
    args, libfuzzer = p.parse_known_args()
    fn, seeds = TARGETS[args.target]
    work = ROOT / "fuzz" / "work" / args.target
    findings = ROOT / "fuzz" / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    if args.inputs:
        argv = [sys.argv[0], *args.inputs]
    else:
        work.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (work / f"seed-{name}").write_bytes(data)
        argv = [sys.argv[0], str(work), f"-max_total_time={max(1, int(args.minutes * 60))}",
                "-timeout=10", "-rss_limit_mb=4096", "-max_len=65536",
                f"-artifact_prefix={findings}/", "-print_final_stats=1", *libfuzzer]
    atheris.Setup(argv, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
