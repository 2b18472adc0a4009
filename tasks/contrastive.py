"""A self-supervised feature extractor for the set metrics: trained contrastively (SimCLR,
NT-Xent loss) on the real train images alone, without labels and without the filter's
label-consistency classifier, so it did not choose the kept set it scores.

Network: the MONAI DenseNet of :func:`tasks.downstream.build_network` with a
``PROJECTION_DIM`` output; its last ``Linear`` is the projection head, and the features are
the pooled activations that feed it (float32 ``(N, D)``). Two augmented views of each image
in a batch (random zoom 0.75-1.0, shift +-8%, rotation +-10 degrees, horizontal flip, gain
0.8-1.2 and offset +-0.1 in [0, 1] pixel units, clipped) are pulled together and pushed
away from the other images of the batch. No noise or blur augmentation, so that the features
stay sensitive to the noise and blur a poor generator makes. Deterministic for a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generators.errors import DataError

NETWORK = "densenet"
PROJECTION_DIM = 64
TEMPERATURE = 0.5
BATCH_SIZE = 32
LR = 1e-3


def build_encoder(in_channels: int, seed: int = 0) -> nn.Module:
    """The MONAI DenseNet, initialised from ``seed`` (the caller's RNG state is left alone):
    float32 ``(B, C, H, W)`` in [0, 1] -> projections ``(B, PROJECTION_DIM)``."""
    from tasks.downstream import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network("classification", NETWORK, in_channels, PROJECTION_DIM)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image: float32 ``(B, C, H, W)`` in [0, 1] -> same shape and range."""
    b = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    zoom, angle = uniform(0.75, 1.0), uniform(-math.pi / 18, math.pi / 18)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.08, 0.08)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.08, 0.08)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain, offset = uniform(0.8, 1.2)[:, None, None, None], uniform(-0.1, 0.1)[:, None, None, None]
    return (view * gain + offset).clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy of two views ``(B, D)`` each."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    n = z1.shape[0]
    similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def train_encoder(model: nn.Module, images: np.ndarray, *, steps: int, seed: int, device: str = "cpu") -> nn.Module:
    """Train ``model`` (from :func:`build_encoder`) for ``steps`` Adam steps on batches of
    ``min(BATCH_SIZE, N)`` real images (float32 ``(N, C, H, W)`` in [0, 1]); returns it in
    eval mode."""
    n = int(images.shape[0])
    if n < 2:
        raise DataError(
            f"expected >= 2 real train images for the self-supervised extractor, got {n}; add data or use "
            "quality.metrics.extractor: random"
        )
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    batch = min(BATCH_SIZE, n)
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    for _ in range(steps):
        rows = torch.from_numpy(np.sort(rng.choice(n, batch, replace=False)))
        x = data[rows]
        v1, v2 = augment(x, generator).to(device), augment(x, generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = nt_xent(model(v1), model(v2))
        loss.backward()
        optimizer.step()
    return model.eval()
