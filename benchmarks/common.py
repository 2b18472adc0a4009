"""Shared pieces of the benchmarks: machine description, timing, peak memory, result
files, and the small fixtures every benchmark builds in a temporary directory (a real
dataset, a generator card with weights, MNI152 slices).

Benchmarks print their figures; each also writes ``benchmarks/results/<name>.json``
(figures, targets, machine, command) so README tables can be checked against a file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LABELS = ("inferior", "middle", "superior")
LOAD_AT_START = os.getloadavg()[0]  # when the benchmark imported this module, before its work


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on (no host names, no user names)."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(LOAD_AT_START, 2),
        "load_avg_1m_now": round(os.getloadavg()[0], 2),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line() -> str:
    """The command that ran this benchmark, as typed from the repository root."""
    module = Path(sys.argv[0]).stem
    return shlex.join(["python", "-m", f"benchmarks.{module}", *sys.argv[1:]])


# --------------------------------------------------------------------------- timing
class Timer:
    """``with Timer() as t: ...``; then ``t.s`` is the wall time in seconds."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._start


class GpuUtilisation:
    """``with GpuUtilisation(device) as u: ...``; then ``u.mean`` / ``u.max`` are the GPU
    utilisation in percent (0-100) sampled every ``interval_s`` by ``nvidia-smi`` (GPU 0
    or ``CUDA_VISIBLE_DEVICES``' first), or None on CPU / without ``nvidia-smi``."""

    def __init__(self, device: str, interval_s: float = 0.1) -> None:
        self.enabled = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.mean: float | None = None
        self.max: float | None = None

    def _sample(self) -> float | None:
        gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self._sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> "GpuUtilisation":
        if self.enabled:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        if self.samples:
            self.mean = sum(self.samples) / len(self.samples)
            self.max = max(self.samples)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size now, MiB (``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_child(module: str, args: Sequence[str], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> <args>`` in a fresh process (so its peak RSS is
    its own) and return the JSON object it prints on its last stdout line."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- reporting
@dataclass(frozen=True)
class Target:
    """One target of the performance issue: ``value`` against ``bound``."""

    name: str
    value: float
    bound: float
    higher_is_better: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return (
            f"TARGET {self.name}: {self.value:.3g}{self.unit} (target {op} {self.bound:g}{self.unit}) -> "
            f"{'met' if self.met else 'NOT met'}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.bound,
            "higher_is_better": self.higher_is_better,
            "met": self.met,
        }


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def save_results(name: str, figures: dict[str, Any], targets: Sequence[Target], device: str = "cpu") -> Path:
    """Write ``benchmarks/results/<name>.json`` and print the targets."""
    for target in targets:
        print(target.line())
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": command_line(),
        "machine": machine(device),
        "figures": figures,
        "targets": [t.as_dict() for t in targets],
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    print(f"results written to {path.relative_to(ROOT)}")
    return path


def print_machine(device: str = "cpu") -> None:
    info = machine(device)
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"load avg {info['load_avg_1m_at_start']} at start, {info['date_utc']} UTC, device {device}"
    )
    if device == "cpu":
        print("note: shared 2-core development CPU; other work ran at the same time, figures are noisy")


# --------------------------------------------------------------------------- fixtures
def mni_slices(size: int = 64, limit: int | None = None) -> list[np.ndarray]:
    """Distinct uint8 ``(1, size, size)`` slices of nilearn's packaged MNI152 T1 template
    (axial, coronal and sagittal, those with >= 5 % foreground): real anatomy, no download."""
    import nibabel as nib

    from generators.shards import from_unit_float
    from tasks.ingest import mni152_files, pad_resize, scale_intensity

    volume = nib.load(str(mni152_files()["t1"])).get_fdata(dtype=np.float32)
    unit = scale_intensity(volume, False, (0.5, 99.5))
    slices = []
    for axis in range(3):
        for k in range(unit.shape[axis]):
            plane = np.take(unit, k, axis=axis)
            if (plane > 0.1).mean() < 0.05:
                continue
            slices.append(from_unit_float(pad_resize(plane[None], size), "uint8"))
            if limit is not None and len(slices) >= limit:
                return slices
    return slices


def write_real_dataset(target: Path, size: int, labels: Sequence[str] = LABELS, per_label: int = 4) -> None:
    """A small labelled real dataset (the synthesize stage reads class counts and dtype)."""
    from generators.shards import Row, write_dataset

    rng = np.random.default_rng(0)
    rows = [
        Row(
            id=f"real-{label}-{i:03d}",
            subject=f"s{i}",
            split="train",
            label=label,
            image=rng.integers(0, 256, (1, size, size), dtype=np.uint8),
            source="bench",
        ).to_record()
        for label in labels
        for i in range(per_label)
    ]
    write_dataset(target, sorted(rows, key=lambda r: r["id"]))


def build_generator(
    architecture: str, size: int, target_dir: Path, labels: Sequence[str] = LABELS, channels: int = 1
) -> Path:
    """A generator card + weights in ``target_dir`` with the demo pipeline's network
    settings (latent 64, base channels 32); returns the card path.

    cgan: untrained seeded weights (speed does not depend on the weights). The others: one
    training epoch on 16 random images through ``generators.training.train_generator``,
    the cheapest way to get their exact networks and samplers."""
    import torch

    from generators.card import Conditioning, ModelCard, Weights, save_card
    from generators.weights import save_weights

    target_dir.mkdir(parents=True, exist_ok=True)
    masks = architecture == "pix2pix"
    if architecture == "cgan":
        from generators.architectures.cgan import CganConfig, ConditionalGenerator, network_kwargs

        config = CganConfig(image_size=size, channels=channels, n_labels=len(labels))
        torch.manual_seed(0)
        state = ConditionalGenerator(config).state_dict()
        network, card_labels, mask_classes = network_kwargs(config), tuple(labels), 0
    else:
        from generators.train_spec import TrainSpec
        from generators.training import TrainingData, train_generator

        rng = np.random.default_rng(0)
        n = 16
        data = TrainingData(
            rng.random((n, channels, size, size), dtype=np.float32),
            (np.arange(n) % len(labels)).astype(np.int64),
            tuple(labels),
            (rng.random((n, size, size)) > 0.5).astype(np.int64) if masks else None,
            2 if masks else 0,
        )
        spec = TrainSpec(architecture=architecture, epochs=1, batch_size=8, with_masks=masks, timesteps=1000)
        result = train_generator(spec, data)
        state, network, card_labels, mask_classes = result.state, result.network, result.labels, result.mask_classes
    sha = save_weights(state, target_dir / "weights.safetensors")
    card = ModelCard(
        id=f"bench/{architecture}-{size}",
        version="0.0.0",
        architecture=architecture,
        network=network,
        modality="MRI",
        anatomy="brain",
        image_size=(size, size),
        channels=channels,
        latent_dim=64 if architecture in ("dcgan", "vae") else None,
        conditioning=Conditioning(
            labels=card_labels,
            masks=mask_classes > 0,
            mask_classes=("background", "foreground")[:mask_classes] if mask_classes else (),
        ),
        licence="CC0-1.0",
        weights=Weights(file="weights.safetensors", sha256=sha, format="safetensors"),
        intended_use="benchmarking only",
    )
    save_card(card, target_dir / "card.yaml")
    return target_dir / "card.yaml"
