"""Set metrics: our FID and KID (``tasks.quality_metrics``) against torchmetrics on the
same features: equal values, and time.

Both see identical features: torchmetrics gets a pass-through "extractor" module (it
accepts any ``nn.Module`` with ``num_features``) fed with the features our extractor
made, so only the metric code differs. Two feature sets:

1. extractor features: the project's ``random-init-densenet`` extractor
   (``tasks.features.random_extractor``) on MNI152 slices (real: slices and their mirror
   images) vs degraded copies (blurred, noisy: "synthetic");
2. scale: N correlated Gaussian features of dimension D (Inception-sized by default).

KID values are compared with one subset of all rows (the unbiased MMD is invariant to
the order of rows, so both implementations must agree exactly), and timed with the usual
random subsets (their subsets differ: numpy vs torch random numbers).

    python -m benchmarks.bench_metrics                       # N = 3,000, D = 1,024, 20 KID subsets
    python -m benchmarks.bench_metrics --n 10000 --dim 2048 --kid-subsets 50  # the issue's 10,000, Inception-sized (~20 min)
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import numpy as np

from benchmarks.common import Target, Timer, mni_slices, print_machine, save_results, table

REL_TOLERANCE = 1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="features per set in the scale run")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension in the scale run")
    parser.add_argument("--kid-subsets", type=int, default=20)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats, interleaved; the best counts")
    return parser.parse_args(argv)


def passthrough(dim: int) -> Any:
    """An ``nn.Module`` that returns its input: torchmetrics' "extractor" for given features."""
    from torch import nn

    class Passthrough(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_features = dim

        def forward(self, x: Any) -> Any:
            return x

    return Passthrough()


def torchmetrics_fid(real: np.ndarray, synthetic: np.ndarray) -> float:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=passthrough(real.shape[1]), normalize=True)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(synthetic), real=False)
    return float(metric.compute())


def torchmetrics_kid(real: np.ndarray, synthetic: np.ndarray, subsets: int, subset_size: int) -> float:
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(
        feature=passthrough(real.shape[1]), subsets=subsets, subset_size=subset_size, normalize=True
    )
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(synthetic), real=False)
    mean, _ = metric.compute()
    return float(mean)


def extractor_features() -> tuple[np.ndarray, np.ndarray, str, float]:
    """(real, synthetic, extractor name, extraction seconds) from the random DenseNet."""
    from scipy.ndimage import gaussian_filter

    from tasks.features import extract_features, random_extractor

    slices = np.stack(mni_slices(64)).astype(np.float32) / 255.0
    real = np.concatenate([slices, slices[..., ::-1]])
    rng = np.random.default_rng(0)
    synthetic = np.clip(gaussian_filter(real, sigma=(0, 0, 1.0, 1.0)) + rng.normal(0, 0.05, real.shape), 0, 1)
    extractor = random_extractor(in_channels=1)
    with Timer() as t:
        f_real = extract_features(extractor, real, normalisation="zscore")
        f_syn = extract_features(extractor, synthetic.astype(np.float32), normalisation="zscore")
    return f_real.astype(np.float64), f_syn.astype(np.float64), extractor.name, t.s


def gaussian_features(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mixing = rng.normal(0, 1, (dim, dim)) / np.sqrt(dim)
    real = rng.normal(0, 1, (n, dim)) @ mixing
    synthetic = (rng.normal(0, 1, (n, dim)) * 1.1 + 0.05) @ mixing
    return real, synthetic


def compare(name: str, real: np.ndarray, synthetic: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from tasks import quality_metrics

    n = min(len(real), len(synthetic))
    out: dict[str, Any] = {"features": name, "n": n, "dim": real.shape[1]}
    size = min(args.kid_subset_size, n)
    timed: dict[str, Callable[[], float]] = {
        "fid_ours": lambda: quality_metrics.fid(real, synthetic),
        "fid_torchmetrics": lambda: torchmetrics_fid(real, synthetic),
        "kid_ours": lambda: quality_metrics.kid(real, synthetic, subsets=args.kid_subsets, subset_size=size)["mean"],
        "kid_torchmetrics": lambda: torchmetrics_kid(real, synthetic, args.kid_subsets, size),
    }
    for _ in range(max(1, args.repeats)):  # interleaved: ours and torchmetrics see the same machine load
        for key, run in timed.items():
            with Timer() as t:
                out[key] = run()
            out[f"{key}_s"] = min(out.get(f"{key}_s", float("inf")), t.s)
    out["fid_rel_diff"] = abs(out["fid_ours"] - out["fid_torchmetrics"]) / max(abs(out["fid_torchmetrics"]), 1e-12)
    # equality: one subset holding every row
    out["kid_all_ours"] = quality_metrics.kid(real, synthetic, subsets=1, subset_size=n)["mean"]
    out["kid_all_torchmetrics"] = torchmetrics_kid(real, synthetic, 1, n)
    out["kid_rel_diff"] = abs(out["kid_all_ours"] - out["kid_all_torchmetrics"]) / max(
        abs(out["kid_all_torchmetrics"]), 1e-12
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise SystemExit("bench_metrics needs torchmetrics: pip install -e '.[test]'") from None
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print_machine()
    print(
        f"bench_metrics: KID {args.kid_subsets} subsets of {args.kid_subset_size}; scale run N={args.n:,d} D={args.dim}"
    )
    real, synthetic, extractor, extract_s = extractor_features()
    print(f"extractor {extractor}: {len(real) + len(synthetic)} images -> features in {extract_s:.1f} s (shared)")
    results = [compare(extractor, real, synthetic, args)]
    real, synthetic = gaussian_features(args.n, args.dim)
    results.append(compare("correlated Gaussian", real, synthetic, args))
    print()
    print(
        table(
            [
                [
                    r["features"],
                    r["n"],
                    r["dim"],
                    r["fid_ours"],
                    r["fid_torchmetrics"],
                    f"{r['fid_rel_diff']:.1e}",
                    r["kid_all_ours"],
                    r["kid_all_torchmetrics"],
                    f"{r['kid_rel_diff']:.1e}",
                ]
                for r in results
            ],  # fmt: skip
            [
                "features",
                "N",
                "D",
                "FID ours",
                "FID torchmetrics",
                "rel diff",
                "KID ours",
                "KID torchmetrics",
                "rel diff",
            ],  # fmt: skip
        )
    )
    print()
    print(
        table(
            [
                [
                    r["features"],
                    r["fid_ours_s"],
                    r["fid_torchmetrics_s"],
                    r["kid_ours_s"],
                    r["kid_torchmetrics_s"],
                    r["kid_ours"],
                    r["kid_torchmetrics"],
                ]
                for r in results
            ],  # fmt: skip
            [
                "features",
                "FID ours s",
                "FID torchmetrics s",
                f"KID ours s ({args.kid_subsets} subsets)",
                "KID torchmetrics s",
                "KID ours (subsets)",
                "KID torchmetrics (subsets)",
            ],  # fmt: skip
        )
    )
    targets = []
    for r in results:
        targets.append(
            Target(
                f"FID relative difference vs torchmetrics ({r['features']})", r["fid_rel_diff"], REL_TOLERANCE, False
            )
        )
        targets.append(
            Target(
                f"KID relative difference vs torchmetrics ({r['features']})", r["kid_rel_diff"], REL_TOLERANCE, False
            )
        )
        for metric in ("fid", "kid"):  # speed: torchmetrics time / ours, same features, same process
            targets.append(
                Target(
                    f"{metric.upper()} speed-up over torchmetrics ({r['features']}, N={r['n']})",
                    r[f"{metric}_torchmetrics_s"] / r[f"{metric}_ours_s"],
                    1.0,
                    unit="x",
                )
            )
    figures = {"runs": results, "extractor": extractor, "extract_s": extract_s, "args": vars(args)}
    save_results("bench_metrics", figures, targets)
    return figures


if __name__ == "__main__":
    main()
