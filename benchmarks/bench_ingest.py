"""Ingest throughput and memory: the ``ingest`` stage on a folder of PNG slices and on a
folder of NIfTI volumes, each at 1x and 10x the data, in fresh processes (peak RSS is
each run's own). Images/s per core = rows / seconds / ``threads``.

Test data is built in a temporary directory from nilearn's packaged MNI152 T1 template
(nothing is downloaded): PNGs are native-resolution slices along all three axes with
each file's index stamped into its corner (no duplicates), one subject per 50 files;
NIfTI volumes are the template with a per-subject intensity scale, int16, gzipped.

Target: peak RSS flat in the data size (10x the data: < 1.5x the 1x growth over the
process's RSS after imports, i.e. nothing proportional to the dataset is held).

    python -m benchmarks.bench_ingest                         # PNG 400 / 4,000; NIfTI 2 / 20 volumes
    python -m benchmarks.bench_ingest --png 2000 --volumes 10 --scale 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    Target,
    Timer,
    current_rss_mb,
    peak_rss_mb,
    print_machine,
    run_child,
    save_results,
    table,
)

LABELS = ("inferior", "middle", "superior")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=int, default=400, help="PNG files at 1x")
    parser.add_argument("--volumes", type=int, default=2, help="NIfTI volumes at 1x")
    parser.add_argument("--scale", type=int, default=10, help="the larger run is this many times 1x")
    parser.add_argument("--threads", type=int, default=1, help="ingest threads (cfg.threads)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- data
def _template() -> np.ndarray:
    import nibabel as nib

    from tasks.ingest import mni152_files

    return nib.load(str(mni152_files()["t1"])).get_fdata(dtype=np.float32)


def make_png_folder(root: Path, n: int) -> None:
    """``n`` 8-bit PNG slices under ``root/<label>/sub-XXXX_<axis>-<k>.png``."""
    from PIL import Image

    volume = _template()
    scaled = np.clip(volume / np.percentile(volume, 99.5) * 255, 0, 255).astype(np.uint8)
    planes = [
        (axis, k) for axis in range(3) for k in range(scaled.shape[axis]) if np.take(scaled, k, axis=axis).mean() > 20
    ]
    for i in range(n):
        axis, k = planes[i % len(planes)]
        plane = np.ascontiguousarray(np.take(scaled, k, axis=axis))
        plane[0, :4] = np.frombuffer(int(i).to_bytes(4, "little"), dtype=np.uint8)
        folder = root / LABELS[i % len(LABELS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(plane).save(folder / f"sub-{i // 50:04d}_{'xyz'[axis]}-{k:03d}-{i:06d}.png")


def make_nifti_folder(root: Path, n: int) -> None:
    """``n`` int16 NIfTI volumes ``root/<label>/sub-XXXX.nii.gz`` (the MNI152 T1, rescaled)."""
    import nibabel as nib

    from tasks.ingest import mni152_files

    template = nib.load(str(mni152_files()["t1"]))
    volume = template.get_fdata(dtype=np.float32)
    for i in range(n):
        data = np.rint(volume * (8.0 + 0.1 * i)).astype(np.int16)
        folder = root / LABELS[i % len(LABELS)]
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, template.affine), folder / f"sub-{i:04d}.nii.gz")


# --------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> None:
    """Ingest ``<project>/raw`` (args.child = project root); print one JSON line."""
    from tasks.config import PipelineConfig
    from tasks.ingest import ingest
    from tasks.paths import PipelinePaths

    root = Path(args.child)
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "raw", "subject_regex": r"(sub-\d+)"},
            "threads": args.threads,
            "device": "cpu",
            "generator": {"id": "unused"},
            "preprocess": {"size": args.size, "bit_depth": 8, "channels": 1, "slice_axis": 2},
        }
    )
    paths = PipelinePaths(root, "bench")
    after_imports = current_rss_mb()
    with Timer() as t:
        summary = ingest(cfg, paths)
    print(
        json.dumps(
            {
                "rows": summary["rows"],
                "time_s": t.s,
                "rss_after_imports_mb": after_imports,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    print_machine()
    print(f"bench_ingest: threads {args.threads}, {args.size}x{args.size} output, 1x and {args.scale}x data")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        for kind, n in (("png", args.png), ("nifti", args.volumes)):
            for factor in (1, args.scale):
                project = tmp / f"{kind}-{factor}x"
                with Timer() as t_make:
                    (make_png_folder if kind == "png" else make_nifti_folder)(project / "raw", n * factor)
                inputs_mb = sum(p.stat().st_size for p in (project / "raw").rglob("*") if p.is_file()) / 2**20
                result = run_child(
                    "bench_ingest",
                    ["--child", str(project), "--threads", str(args.threads), "--size", str(args.size)],
                )
                result.update(kind=kind, factor=factor, inputs=n * factor, inputs_mb=inputs_mb, make_s=t_make.s)
                result["img_s_per_core"] = result["rows"] / result["time_s"] / args.threads
                result["growth_mb"] = result["peak_rss_mb"] - result["rss_after_imports_mb"]
                runs.append(result)
                print(
                    f"  {kind} {factor:>2}x: {result['inputs']} inputs ({inputs_mb:.0f} MiB) -> {result['rows']} rows "
                    f"in {result['time_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MiB"
                )
    print()
    print(
        table(
            [
                [
                    r["kind"],
                    f"{r['factor']}x",
                    r["inputs"],
                    r["rows"],
                    r["img_s_per_core"],
                    r["peak_rss_mb"],
                    r["growth_mb"],
                ]
                for r in runs
            ],
            ["source", "data", "inputs", "rows", "img/s per core", "peak RSS MiB", "peak - after imports MiB"],
        )
    )
    targets = []
    figures: dict[str, Any] = {"runs": runs, "args": vars(args)}
    for kind in ("png", "nifti"):
        small, large = [r for r in runs if r["kind"] == kind]
        ratio = large["growth_mb"] / max(small["growth_mb"], 1.0)
        per_1k_rows = (large["peak_rss_mb"] - small["peak_rss_mb"]) / max(large["rows"] - small["rows"], 1) * 1000
        figures[f"{kind}_growth_ratio"] = ratio
        figures[f"{kind}_mb_per_1k_rows"] = per_1k_rows
        print(f"{kind}: {per_1k_rows:+.2f} MiB peak RSS per 1,000 more rows; {args.scale}x data -> {ratio:.2f}x growth")
        targets.append(Target(f"{kind}: peak RSS growth at {args.scale}x data / at 1x (flat)", ratio, 1.5, False))
    save_results("bench_ingest", figures, targets)
    return figures


if __name__ == "__main__":
    main()
