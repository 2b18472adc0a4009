"""Versioning cost: ``dvc add`` + ``dvc push`` of N images stored as Parquet shards vs as
loose PNG files, to a real S3 API (moto in server mode on 127.0.0.1, DVC's S3 remote with
``endpointurl``), and what an incremental version costs: one more shard must upload only
that shard (plus the new manifest and DVC's directory listing), counted in the bucket.

Images: distinct 64x64 MNI152 slices (nilearn's packaged template) with each image's
index stamped into its first pixels, so no two files are equal and DVC cannot deduplicate.

Target: loose files take >= 20x longer to add + push than shards.

    python -m benchmarks.bench_versioning                    # N = 5,000
    python -m benchmarks.bench_versioning --n 50000          # the issue's full size
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import Target, Timer, mni_slices, print_machine, save_results, table

KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="images per dataset")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=1000, help="rows per shard; must divide --n")
    parser.add_argument("--jobs", type=int, default=None, help="dvc push --jobs (DVC's default when unset)")
    return parser.parse_args(argv)


def images(n: int, size: int) -> list[np.ndarray]:
    """``n`` distinct uint8 ``(1, size, size)`` images: MNI152 slices, index stamped in."""
    base = mni_slices(size)
    out = []
    for i in range(n):
        image = base[i % len(base)].copy()
        image[0, 0, :4] = np.frombuffer(int(i).to_bytes(4, "little"), dtype=np.uint8)
        out.append(image)
    return out


def write_shards(target: Path, pictures: list[np.ndarray], shard_rows: int) -> None:
    from generators.shards import Row, write_dataset

    records = (
        Row(id=f"img-{i:07d}", subject=f"s{i // 200}", split="train", label="x", image=im, source="bench").to_record()
        for i, im in enumerate(pictures)
    )
    write_dataset(target, records, shard_rows=shard_rows)


def write_loose(target: Path, pictures: list[np.ndarray], start: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(pictures, start):
        Image.fromarray(im[0]).save(target / f"img-{i:07d}.png")


class Project:
    """A DVC project (no git) with a default S3 remote at ``s3://bucket/prefix``."""

    def __init__(self, root: Path, endpoint: str, bucket: str, prefix: str, jobs: int | None) -> None:
        self.root = root
        self.jobs = jobs
        root.mkdir(parents=True)
        empty = root.parent / "aws-empty-config"
        empty.write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            **KEYS,
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "DVC_NO_ANALYTICS": "1",
        }
        self.dvc("init", "--no-scm", "-q")
        self.dvc("config", "core.analytics", "false")
        self.dvc("remote", "add", "-d", "store", f"s3://{bucket}/{prefix}")
        self.dvc("remote", "modify", "store", "endpointurl", endpoint)

    def dvc(self, *args: str) -> float:
        """Run ``dvc <args>`` in the project; returns its wall time in seconds."""
        dvc = Path(sys.executable).with_name("dvc")
        with Timer() as t:
            proc = subprocess.run(
                [str(dvc) if dvc.exists() else "dvc", *args],
                cwd=self.root,
                env=self.env,
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return t.s

    def add_push(self, path: str) -> dict[str, float]:
        add_s = self.dvc("add", "-q", path)
        push_s = self.dvc("push", "-q", *(["--jobs", str(self.jobs)] if self.jobs else []))
        return {"add_s": add_s, "push_s": push_s, "total_s": add_s + push_s}


def count_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = item["Size"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    args = parse_args(argv)
    if args.n % args.shard_rows:
        raise SystemExit(f"--n {args.n} must be a multiple of --shard-rows {args.shard_rows} (whole shards)")
    print_machine()
    print(f"bench_versioning: {args.n:,d} images at {args.size}x{args.size}, shards of {args.shard_rows} rows")
    pictures = images(args.n + args.shard_rows, args.size)
    first, extra = pictures[: args.n], pictures[args.n :]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    figures: dict[str, Any] = {"args": vars(args)}
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory(prefix="bench-versioning-") as tmp_name:
            tmp = Path(tmp_name)
            # shards
            shards = Project(tmp / "shards", endpoint, bucket, "shards", args.jobs)
            write_shards(shards.root / "data", first, args.shard_rows)
            figures["shards"] = shards.add_push("data")
            before = count_objects(client, bucket, "shards/")
            figures["shards"].update(objects=len(before), bytes=sum(before.values()))
            # one more shard: the first shards are byte-identical, so only the new one uploads
            write_shards(shards.root / "data", first + extra, args.shard_rows)
            figures["shards_incremental"] = shards.add_push("data")
            after = count_objects(client, bucket, "shards/")
            new = sorted(set(after) - set(before))
            figures["shards_incremental"].update(new_objects=len(new), new_bytes=sum(after[k] for k in new))
            # loose PNG files
            loose = Project(tmp / "loose", endpoint, bucket, "loose", args.jobs)
            write_loose(loose.root / "data", first)
            figures["loose"] = loose.add_push("data")
            before = count_objects(client, bucket, "loose/")
            figures["loose"].update(objects=len(before), bytes=sum(before.values()))
            write_loose(loose.root / "data", extra, start=args.n)
            figures["loose_incremental"] = loose.add_push("data")
            after = count_objects(client, bucket, "loose/")
            new = sorted(set(after) - set(before))
            figures["loose_incremental"].update(new_objects=len(new), new_bytes=sum(after[k] for k in new))
    finally:
        server.stop()

    rows = [
        [
            name,
            f["add_s"],
            f["push_s"],
            f["total_s"],
            f.get("objects", f.get("new_objects")),
            f.get("bytes", f.get("new_bytes")),
        ]
        for name, f in (
            (f"shards ({args.n:,d} images)", figures["shards"]),
            (f"loose PNG ({args.n:,d} images)", figures["loose"]),
            (f"shards: +1 shard ({args.shard_rows} images)", figures["shards_incremental"]),
            (f"loose PNG: +{args.shard_rows} files", figures["loose_incremental"]),
        )
    ]
    print()
    print(table(rows, ["dataset", "dvc add s", "dvc push s", "total s", "objects uploaded", "bytes uploaded"]))
    ratio = figures["loose"]["total_s"] / figures["shards"]["total_s"]
    figures["ratio_loose_over_shards"] = ratio
    new_objects = figures["shards_incremental"]["new_objects"]
    print(f"\nloose / shards (add + push): {ratio:.1f}x")
    print(
        f"incremental: one new shard uploaded {new_objects} objects (expected 3: the shard, the manifest, DVC's .dir)"
    )
    targets = [
        Target("add+push time, loose PNG / shards (x)", ratio, 20),
        Target("objects uploaded for one new shard", float(new_objects), 3, False),
    ]
    save_results("bench_versioning", figures, targets)
    return figures


if __name__ == "__main__":
    main()
