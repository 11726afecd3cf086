"""``imgrec index SOURCE --ray [ADDRESS]``: the Ray side of bulk_index's command line."""

from __future__ import annotations

import argparse
import re
import sys

from app.serving.ray_index.source import SourceError
from app.settings import Settings

# host:port (a cluster's GCS), ray://host:port (Ray Client), auto, local
ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-\[\]:]+:\d+)$")


def check_ray_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shard is not None:
        ap.error("--shard: not with --ray (Ray splits the catalogue among its workers)")
    if not ADDRESS.match(args.ray):
        ap.error(f"--ray {args.ray!r}: expected auto, ray://HOST:PORT or HOST:PORT, or nothing "
                 "for a local Ray (put SOURCE before --ray)")
    if args.ray != "local" and (args.num_cpus is not None or args.num_gpus is not None):
        ap.error("--num-cpus/--num-gpus size a local Ray; a cluster has its own")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        ap.error("--ray needs Ray Data: pip install 'imgrec[ray]'")


def ray_index_main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the pipeline; the summary on stderr, the same figures as one JSON line on stdout."""
    from app.serving.ray_index.pipeline import RayOptions, run_ray_index

    options = RayOptions(address=None if args.ray == "local" else args.ray,
                         num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         progress=not args.no_progress)
    try:
        tally = run_ray_index(args.source, settings, options, namespace=args.namespace,
                              parquet=args.parquet, report=args.report)
    except SourceError as e:
        print(f"imgrec index: {e}", file=sys.stderr)
        return 2
    print(tally.summary(), file=sys.stderr)
    print(tally.json_line(report=str(args.report) if args.report else None,
                          parquet=str(args.parquet) if args.parquet else None), flush=True)
    return 0
