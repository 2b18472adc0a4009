"""Torch runtime settings shared by the stages: threads, seeds, determinism, device."""

from __future__ import annotations

import random

import numpy as np
import torch

from tasks.config import PipelineConfig


def setup_torch(cfg: PipelineConfig, seed: int | None = None) -> str:
    """Fix threads and seeds, turn on deterministic algorithms; returns the device name.

    Bitwise reproducibility holds for the same hardware, thread count and library
    versions (CPU); on GPU results are reproducible up to floating-point noise.
    """
    torch.set_num_threads(cfg.threads)
    seed = cfg.seed if seed is None else seed
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
