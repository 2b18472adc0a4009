"""Synthesis throughput: the ``synthesize`` stage end to end (generate + encode + write
shards, manifest included) against the bare forward pass at the same batch size, against
the same stage without the generate/encode overlap and with PNG cells, the same stage and
forward pass with ``torch.compile`` (``synthesis.compile: true``; the one-off compile is
timed apart), and two naive baselines (one image per forward pass, one PNG file per image:
a Pillow loop, and the MONAI MedNIST GAN bundle's own ``SaveImaged`` post-processing).
Then the encoding table: PNG levels 0/1/6 and raw bytes + zstd/lz4 on real MNI152
slices, bytes per image. On CUDA the GPU utilisation of each timed run is sampled with
``nvidia-smi`` every 100 ms.

Targets (performance issue): end-to-end >= 80 % of the bare forward pass; >= 10x the
naive baseline.

    python -m benchmarks.bench_synthesis                       # CPU, cgan 64x64, ~3 min
    python -m benchmarks.bench_synthesis --count 12288 --naive-count 192 --skip-encoding   # the README figures
    python -m benchmarks.bench_synthesis --device cuda --architectures cgan vae ddpm pix2pix --sizes 64 256 --dtypes fp32 bf16 --count 50000

``--dtypes`` sets the precision of the bare forward pass (bf16 = autocast; CUDA also uses
channels_last); the stage itself always runs the architecture's own policy (bf16 autocast
on CUDA, fp32 on CPU), so on CUDA compare the stage with the bf16 row.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.common import (
    LABELS,
    ROOT,
    GpuUtilisation,
    Target,
    Timer,
    build_generator,
    mni_slices,
    print_machine,
    save_results,
    table,
    write_real_dataset,
)

MEDNIST_INFERENCE = ROOT / "generators" / "zoo" / "mednist_gan" / "configs" / "inference.json"
ARCHITECTURES = ("cgan", "vae", "ddpm", "pix2pix")  # conditional: the stage makes images per class


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="image sizes (square)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--architectures", nargs="+", default=["cgan"], choices=ARCHITECTURES)
    parser.add_argument("--count", type=int, default=4096, help="images per stage run / bare forward run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best rate counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=512)
    parser.add_argument("--naive-count", type=int, default=96, help="images for the naive batch-1 baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--encoding-count", type=int, default=600, help="MNI152 slices for the encoding table")
    parser.add_argument("--skip-variants", action="store_true", help="only the overlapped stage, no ablations")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--skip-encoding", action="store_true")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- forward
def bare_what(generator: Any) -> str:
    """What :func:`bare_forward_rate` times for this generator."""
    if generator.card.architecture == "cgan" and getattr(generator, "module", None) is not None:
        return "network forward"
    return "generate() (sampler)"


def bare_forward_rate(generator: Any, batch_size: int, count: int, dtype: str, device: str) -> float:
    """Images/s of the network alone (cgan: ``module(z, onehot)``, no sigmoid, no host
    copy) or, for samplers, of ``generate`` itself (see :func:`bare_what`). A generator
    passed through ``generators.compiled.compile_generator`` times the compiled network."""
    import torch
    import torch.nn.functional as F

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    module = getattr(generator, "module", None)
    if generator.card.architecture == "cgan" and module is not None:
        if cuda:
            module = module.to(memory_format=torch.channels_last)
        cfg = generator.cfg
        z = torch.randn(batch_size, cfg.latent_dim, device=device)
        onehot = F.one_hot(torch.arange(batch_size, device=device) % cfg.n_labels, cfg.n_labels).float()

        def step() -> None:
            module(z, onehot)

    else:
        labels = [LABELS[i % len(LABELS)] for i in range(batch_size)]

        def step() -> None:
            generator.generate(batch_size, seed=0, condition=labels)

    batches = max(1, count // batch_size)
    with torch.inference_mode(), autocast:
        step()  # warm-up
        sync()
        with Timer() as t:
            for _ in range(batches):
                step()
            sync()
    return batches * batch_size / t.s


# --------------------------------------------------------------------------- stage
def stage_rate(
    root: Path,
    card: Path,
    size: int,
    args: argparse.Namespace,
    *,
    overlap: bool = True,
    encoding: str = "raw",
    count: int | None = None,
    compile: bool = False,
) -> float:
    """Images/s of ``tasks.synthesize.synthesize`` (load, plan, generate, encode, write,
    manifest) for ``count`` (default ``args.count``) images split over the classes;
    ``compile``: with ``synthesis.compile: true`` (the compiled code of an earlier call in
    this process is reused, so a warm-up call takes the one-off compile)."""
    import shutil

    import generators.shards as shards
    from tasks.config import PipelineConfig
    from tasks.paths import PipelinePaths
    from tasks.synthesize import synthesize

    paths = PipelinePaths(root, "bench")
    if not paths.real.exists():
        write_real_dataset(paths.real, size)
    if paths.generator.exists():
        shutil.rmtree(paths.generator)
    shutil.copytree(card.parent, paths.generator)
    per_class = (args.count if count is None else count) // len(LABELS)
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "unused"},
            "device": args.device,
            "threads": args.threads,
            "generator": {"id": "bench"},
            "synthesis": {
                "count_per_class": per_class,
                "shard_rows": args.shard_rows,
                "batch_size": args.batch_size,
                "compile": compile,
            },
        }
    )

    def one_after_another(make: Callable, plans: list) -> Any:
        return (make(plan) for plan in plans)

    before = shards.IMAGE_ENCODING
    shards.IMAGE_ENCODING = encoding
    try:
        with Timer() as t:
            synthesize(cfg, paths, map_shards=None if overlap else one_after_another)
    finally:
        shards.IMAGE_ENCODING = before
    shutil.rmtree(paths.synthetic)
    return per_class * len(LABELS) / t.s


def naive_rate(generator: Any, out: Path, count: int, batch_size: int) -> float:
    """One PNG file per image (Pillow defaults), ``batch_size`` images per ``generate``."""
    from generators.shards import from_unit_float

    out.mkdir(parents=True, exist_ok=True)
    made = 0
    with Timer() as t:
        while made < count:
            n = min(batch_size, count - made)
            labels = [LABELS[(made + i) % len(LABELS)] for i in range(n)]
            batch = generator.generate(n, seed=made, condition=labels)
            for i in range(n):
                pixels = from_unit_float(batch.images[i], "uint8")
                Image.fromarray(pixels[0]).save(out / f"syn-{labels[i]}-{made + i:07d}.png")
            made += n
    return count / t.s


def naive_monai_rate(generator: Any, out: Path, count: int) -> float:
    """The MONAI MedNIST GAN bundle's own inference post-processing, image by image: the
    network's raw output for one latent through the ``postprocessing`` of the shipped
    bundle's ``configs/inference.json`` (``Activationsd`` sigmoid, ``ToTensord``,
    ``SaveImaged`` PNG at scale 255, uint8), parsed by MONAI's ``ConfigParser`` with only
    ``output_dir`` overridden. cGAN only (needs the raw network)."""
    import logging

    import torch
    import torch.nn.functional as F
    from monai.bundle import ConfigParser

    out.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config(MEDNIST_INFERENCE)
    parser["output_dir"] = str(out)
    post = parser.get_parsed_content("postprocessing")
    cfg = generator.cfg
    logging.getLogger("monai.data.image_writer").setLevel(logging.WARNING)  # it logs every file at INFO
    with Timer() as t, torch.inference_mode():
        for i in range(count):
            z = torch.randn(1, cfg.latent_dim)
            onehot = F.one_hot(torch.tensor([i % cfg.n_labels]), cfg.n_labels).float()
            raw = generator.module(z, onehot)
            post({"pred": raw[0]})
    if len(list(out.glob("*.png"))) < count:
        raise RuntimeError(f"the bundle's post-processing wrote fewer than {count} PNG files to {out}")
    return count / t.s


# --------------------------------------------------------------------------- encodings
def _png(level: int) -> Callable[[np.ndarray], bytes]:
    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


def encoding_table(images: list[np.ndarray], tmp: Path) -> list[dict[str, Any]]:
    """Encode, write (one Parquet file, as the dataset writer does), read back and decode
    ``images`` with each candidate; bytes/img is the Parquet file size per image."""
    from generators.shards import decode_image, encode_raw

    candidates = [
        ("png level 0", _png(0), "zstd"),
        ("png level 1 (previous default)", _png(1), "zstd"),
        ("png level 6 (Pillow default)", _png(6), "zstd"),
        ("raw + zstd (new default)", encode_raw, "zstd"),
        ("raw + lz4", encode_raw, "lz4"),
    ]
    rows = []
    for name, encode, compression in candidates:
        with Timer() as t_enc:
            blobs = [encode(image) for image in images]
        data = pa.table({"image": pa.array(blobs, pa.binary())})
        path = tmp / "enc.parquet"
        with Timer() as t_write:
            pq.write_table(data, path, compression=compression)
        with Timer() as t_read:
            back = pq.read_table(path).column("image").to_pylist()
            decoded = [decode_image(b) for b in back]
        if not all(np.array_equal(a, b) for a, b in zip(decoded, images, strict=True)):
            raise RuntimeError(f"{name}: not lossless")
        n = len(images)
        rows.append(
            {
                "encoding": name,
                "encode_img_s": n / t_enc.s,
                "encode_write_img_s": n / (t_enc.s + t_write.s),
                "read_decode_img_s": n / t_read.s,
                "bytes_per_img": path.stat().st_size / n,
            }
        )
    return rows


def io_only(images: list[np.ndarray], tmp: Path) -> dict[str, float]:
    """Writing already generated images: shards (``write_dataset``, raw + zstd, fsync) vs
    one PNG file per image (Pillow defaults, no fsync): the part a GPU leaves to the host."""
    from generators.shards import Row, write_dataset

    n = len(images)
    with Timer() as t_shards:
        records = (
            Row(id=f"{i:07d}", subject="synthetic", split="train", label="x", image=im, source="bench").to_record()
            for i, im in enumerate(images)
        )
        write_dataset(tmp / "shards", records, shard_rows=512)
    loose = tmp / "loose"
    loose.mkdir()
    with Timer() as t_files:
        for i, im in enumerate(images):
            Image.fromarray(im[0]).save(loose / f"{i:07d}.png")
    return {"shards_img_s": n / t_shards.s, "loose_png_img_s": n / t_files.s, "ratio": t_files.s / t_shards.s}


# --------------------------------------------------------------------------- main
def measure_architecture(arch: str, size: int, card: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every rate of one architecture and size, interleaved ``args.repeats`` times (best
    of: the CPU is shared). Compiled rows come after a warm-up that pays the one-off
    compile, recorded as ``compile_warmup_s``."""
    from generators.compiled import compile_generator
    from generators.registry import load_generator

    generator = load_generator(card, args.device)
    row: dict[str, Any] = {"architecture": arch, "size": size, "bare_timed": bare_what(generator)}
    run_dir = tmp / f"run-{arch}-{size}"
    warm_count = args.batch_size * len(LABELS)
    stage_rate(run_dir, card, size, args, count=warm_count)  # warm-up
    stage = partial(stage_rate, run_dir, card, size, args)
    variants: dict[str, Callable[[], float]] = {"stage_img_s": stage}
    for dtype in args.dtypes:
        variants[f"bare_{dtype}_img_s"] = partial(
            bare_forward_rate, generator, args.batch_size, args.count, dtype, args.device
        )
    if not args.no_compile:
        with Timer() as warm:
            stage_rate(run_dir, card, size, args, count=warm_count, compile=True)
        row["compile_warmup_s"] = warm.s
        compiled = load_generator(card, args.device)
        compile_generator(compiled)
        variants["stage_compiled_img_s"] = partial(stage, compile=True)
        stage_dtype = "bf16" if args.device.startswith("cuda") else "fp32"  # the stage's own policy
        variants["bare_compiled_img_s"] = partial(
            bare_forward_rate, compiled, args.batch_size, args.count, stage_dtype, args.device
        )
    if not args.skip_variants:
        variants["stage_no_overlap_img_s"] = partial(stage, overlap=False)
        variants["stage_png_cells_img_s"] = partial(stage, encoding="png")
    naive_n = max(1, args.naive_count)
    variants["naive_b1_img_s"] = partial(naive_rate, generator, tmp / "naive-b1", naive_n, 1)
    variants["naive_same_batch_img_s"] = partial(
        naive_rate, generator, tmp / "naive-bs", max(naive_n, args.batch_size), args.batch_size
    )
    if arch == "cgan":
        variants["naive_monai_b1_img_s"] = partial(naive_monai_rate, generator, tmp / "naive-monai", naive_n)
    for _ in range(args.repeats):
        for key, measure in variants.items():
            with GpuUtilisation(args.device) as utilisation:
                rate = measure()
            if rate > row.get(key, 0.0):
                row[key] = rate
                if utilisation.mean is not None:  # CUDA: of the run that counts
                    row[key.replace("_img_s", "_gpu_util_pct")] = utilisation.mean
    return row


def bare_reference(row: dict[str, Any], device: str) -> float:
    """The bare forward rate the eager stage compares with (bf16 on CUDA: the stage autocasts)."""
    if device.startswith("cuda") and "bare_bf16_img_s" in row:
        return row["bare_bf16_img_s"]
    return row.get("bare_fp32_img_s", row.get("bare_bf16_img_s"))


def best_stage(row: dict[str, Any]) -> float:
    return max(row["stage_img_s"], row.get("stage_compiled_img_s", 0.0))


def row_targets(row: dict[str, Any], device: str) -> list[Target]:
    """Stage / bare forward (eager and compiled, each against its own forward pass) and
    the best stage / naive batch-1 PNG files."""
    tag = f"{row['architecture']} {row['size']}x{row['size']} {device}"
    targets = [Target(f"stage / bare forward, eager ({tag})", row["stage_img_s"] / bare_reference(row, device), 0.8)]
    if "stage_compiled_img_s" in row:
        targets.append(
            Target(
                f"stage / bare forward, torch.compile ({tag})",
                row["stage_compiled_img_s"] / row["bare_compiled_img_s"],
                0.8,
            )
        )
    targets.append(Target(f"best stage / naive batch-1 PNG files ({tag})", best_stage(row) / row["naive_b1_img_s"], 10))
    return targets


def print_rows(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The images/s table (the ratios use the best stage: compiled where measured)."""
    compiled = not args.no_compile
    headers = ["arch", "size", *[f"bare {d}" for d in args.dtypes], "stage (overlap, raw)"]
    if compiled:
        headers += ["bare compiled", "stage compiled", "compile warm-up s"]
    if not args.skip_variants:
        headers += ["stage no overlap", "stage PNG cells"]
    headers += ["naive b=1 files", "naive b=1 MONAI SaveImage", f"naive b={args.batch_size} files"]
    headers += ["stage/bare", "best stage/naive b=1"]
    gpu = any("stage_gpu_util_pct" in r for r in results)
    if gpu:
        headers += ["GPU util % stage", "GPU util % stage compiled", "GPU util % bare"]
    lines = []
    for r in results:
        cells = [r["architecture"], r["size"], *[r[f"bare_{d}_img_s"] for d in args.dtypes], r["stage_img_s"]]
        if compiled:
            cells += [r["bare_compiled_img_s"], r["stage_compiled_img_s"], r["compile_warmup_s"]]
        if not args.skip_variants:
            cells += [r["stage_no_overlap_img_s"], r["stage_png_cells_img_s"]]
        cells += [r["naive_b1_img_s"], r.get("naive_monai_b1_img_s", "-"), r["naive_same_batch_img_s"]]
        cells += [r["stage_img_s"] / bare_reference(r, args.device), best_stage(r) / r["naive_b1_img_s"]]
        if gpu:
            bare_key = "bare_bf16_gpu_util_pct" if "bare_bf16_gpu_util_pct" in r else "bare_fp32_gpu_util_pct"
            cells += [r.get(k, "-") for k in ("stage_gpu_util_pct", "stage_compiled_gpu_util_pct", bare_key)]
        lines.append(cells)
    print("\nimages/s (bare = " + results[0]["bare_timed"] + ")")
    print(table(lines, headers))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu")
    torch.set_num_threads(args.threads)
    print_machine(args.device)
    print(
        f"bench_synthesis: {args.count} images per stage run, batch {args.batch_size}, "
        f"shards of {args.shard_rows}, torch threads {args.threads}"
    )
    results: list[dict[str, Any]] = []
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-synthesis-") as tmp_name:
        tmp = Path(tmp_name)
        for arch in args.architectures:
            for size in args.sizes:
                card = build_generator(arch, size, tmp / f"card-{arch}-{size}")
                row = measure_architecture(arch, size, card, tmp, args)
                results.append(row)
                targets.extend(row_targets(row, args.device))
        print_rows(results, args)
        figures: dict[str, Any] = {"runs": results, "args": vars(args)}
        if not args.skip_encoding:
            size = args.sizes[0]
            slices = mni_slices(size, limit=args.encoding_count)
            enc_rows = encoding_table(slices, tmp)
            print(f"\nlossless encodings, {len(slices)} distinct MNI152 T1 slices at {size}x{size} (uint8)")
            print(
                table(
                    [
                        [
                            e["encoding"],
                            e["encode_img_s"],
                            e["encode_write_img_s"],
                            e["read_decode_img_s"],
                            e["bytes_per_img"],
                        ]
                        for e in enc_rows
                    ],
                    ["encoding", "encode img/s", "encode+write img/s", "read+decode img/s", "bytes/img"],
                )
            )
            storage = io_only(slices, tmp / "io")
            print(
                f"\nstorage path only (images already generated): shards {storage['shards_img_s']:,.0f} img/s, "
                f"loose PNG files {storage['loose_png_img_s']:,.0f} img/s, ratio {storage['ratio']:.1f}x"
            )
            figures["encodings"] = enc_rows
            figures["storage_only"] = storage
    save_results("bench_synthesis", figures, targets, args.device)
    return figures


if __name__ == "__main__":
    main()
