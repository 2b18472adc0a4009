"""A tiny but complete synthmed project in a temporary directory: a folder of phantom
PNGs (3 classes, several subjects), a ``pipelines.yaml`` with pipeline ``tiny`` sized to
run end to end in well under a minute, and optionally git + DVC set up."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from tests.tasks.phantoms import CLASSES, draw_phantom

TINY = {
    "description": "phantoms, end to end in seconds",
    "seed": 0,
    "threads": 2,
    "device": "cpu",
    "source": {"kind": "folder", "path": "images", "subject_regex": r"^(sub\d+)_"},
    "preprocess": {"size": 16, "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "generator": {"train": {"epochs": 3, "batch_size": 16, "latent_dim": 8, "base_channels": 8, "checkpoint_every": 1}},
    "synthesis": {"count_per_class": 6, "shard_rows": 8, "batch_size": 8},
    # a 3-epoch toy GAN is told apart from real images: no realism bound here (plumbing test;
    # the realism gate is proven in tests/tasks/test_realism.py and test_filter.py). The
    # two-sample test and the self-supervised extractor still run, on a small budget.
    "quality": {
        "label_consistency": {"enabled": True, "min_confidence": 0.0, "epochs": 1},
        "metrics": {"self_supervised_steps": 10},
        "realism": {"folds": 2, "epochs": 2, "min_steps": 0, "bootstrap": 100},
        "gate": {"max_two_sample_auc": None},
    },
    "retrain": {"steps": 4, "batch_size": 8, "seeds": [0, 1]},
    "report": {"grid_per_class": 2},
}


#: the CI-sized twin of pipelines.yaml's ``demo-3d``: MNI152 cubes at 3 mm (16^3 train and
#: test cubes, slabs along the anterior-posterior axis), a paired 3D VAE trained 2 epochs,
#: a 3D UNet retrained 4 steps; a plumbing test (no realism bound), seconds per stage
TINY_3D = {
    "description": "MNI152 cubes, volumes end to end in about a minute",
    "seed": 0,
    "threads": 2,
    "device": "cpu",
    "source": {"kind": "mni152", "levels_mm": [], "level_names": ["brain"]},
    "preprocess": {
        "dims": 3,
        "spacing_mm": [3.0, 3.0, 3.0],
        "patch": {"size": 16, "per_volume": 24, "eval_size": 16, "eval_per_volume": 3, "split_axis": 1},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
    },
    "generator": {
        "train": {"architecture": "vae3d", "with_masks": True, "epochs": 2, "batch_size": 4, "base_channels": 8}
    },
    "synthesis": {"count_per_class": 12, "shard_rows": 8, "batch_size": 4},
    "quality": {
        "label_consistency": {"enabled": False},
        "metrics": {"self_supervised_steps": 10},
        "realism": {"folds": 2, "epochs": 1, "min_steps": 0, "bootstrap": 100},
        "gate": {"max_two_sample_auc": None},
    },
    "retrain": {"task": "segmentation", "network": "unet", "steps": 4, "batch_size": 4, "seeds": [0, 1]},
    "report": {"grid_per_class": 2},
}


def write_images(root: Path, subjects: int = 8, per_subject: int = 2, size: int = 24) -> None:
    """``root/<class>/sub<k>_<i>.png``: grey uint8 phantoms."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        folder = root / label
        folder.mkdir(parents=True)
        for subject in range(subjects):
            for i in range(per_subject):
                image, _ = draw_phantom(label, rng, size)
                buffer = io.BytesIO()
                Image.fromarray(image[0]).save(buffer, format="PNG")
                (folder / f"sub{subject:02d}_{i}.png").write_bytes(buffer.getvalue())


def make_project(root: Path, *, dvc: bool = False, overrides: dict | None = None, base: dict | None = None) -> Path:
    """Write images + pipelines.yaml with pipeline ``tiny`` = ``base`` (default
    :data:`TINY`) updated by ``overrides`` (and a git repo with DVC and dvc.yaml when ``dvc``)."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root / "images")
    pipeline = {**(TINY if base is None else base), **(overrides or {})}
    (root / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": {"tiny": pipeline}}, sort_keys=False))
    if dvc:
        run(["git", "init", "-q"], root)
        run(["git", "config", "user.email", "test@example.org"], root)
        run(["git", "config", "user.name", "synthmed test"], root)
        run([sys.executable, "-m", "dvc", "init", "-q"], root)
        rendered = run([sys.executable, "-m", "flows.cli", "dvc-yaml", "--pipeline", "tiny", "--no-code"], root)
        (root / "dvc.yaml").write_text(rendered)
        (root / ".gitignore").write_text(".synthmed/\n")
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-q", "-m", "tiny project"], root)
    return root / "pipelines.yaml"


def env() -> dict[str, str]:
    """The environment for CLI calls: this interpreter's bin first (``synthmed``, ``dvc``),
    and the repo on PYTHONPATH so ``python -m flows.cli`` works from any directory."""
    repo = Path(__file__).resolve().parents[2]
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "DVC_NO_ANALYTICS": "1",  # no analytics daemon per DVC call (no network here anyway)
    }


def run(args: list[str], cwd: Path, check: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def without_timings(value: Any) -> Any:
    """A stage's JSON summary without wall-clock fields (keys ending ``time_s`` or
    ``elapsed_s``): what must be equal between two runs of the same recipe."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith(("time_s", "elapsed_s"))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value
