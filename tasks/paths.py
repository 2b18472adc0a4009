"""Where a pipeline's stages read and write, relative to the project root.

The layout is fixed so that ``dvc.yaml`` can name every output::

    data/<pipeline>/real/         ingested real images (dataset)
    data/<pipeline>/rejects.json  inputs refused at ingest, with reasons
    models/<pipeline>/generator/  card.yaml + weights + training curves
    data/<pipeline>/synthetic/    synthesized images (dataset)
    data/<pipeline>/filtered/     synthetic images that passed the filters (dataset)
    metrics/<pipeline>/           quality.json, retrain.json (DVC metrics)
    reports/<pipeline>/           report.md + PNG grids
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelinePaths:
    """All paths of one pipeline under ``root``."""

    root: Path
    pipeline: str

    @property
    def real(self) -> Path:
        return self.root / "data" / self.pipeline / "real"

    @property
    def rejects(self) -> Path:
        return self.root / "data" / self.pipeline / "rejects.json"

    @property
    def generator(self) -> Path:
        return self.root / "models" / self.pipeline / "generator"

    @property
    def synthetic(self) -> Path:
        return self.root / "data" / self.pipeline / "synthetic"

    @property
    def filtered(self) -> Path:
        return self.root / "data" / self.pipeline / "filtered"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics" / self.pipeline

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.pipeline

    @property
    def state(self) -> Path:
        """Local, untracked bookkeeping (stage fingerprints, caches)."""
        return self.root / ".synthmed" / self.pipeline
