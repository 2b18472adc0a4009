"""The per-image seed stream: image ``i`` of a request is a pure function of ``(seed, i)``,
for every architecture, through ``api.generate``, the DataLoader and the synthesize stage,
whatever the batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from generators import api
from generators.errors import GeneratorError
from generators.registry import load_generator
from generators.seed_stream import CHOICE, LATENT, generate_range, image_rng, offset, step_stream, stream_normal
from tasks.synthesize import ShardPlan, generate_batches
from tests.generators.tiny_models import VARIANTS, make_tiny

N = 200


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "registry"))
    return tmp_path / "registry"


def test_stream_follows_the_documented_rule():
    rows = stream_normal((3, 2, 4), seed=5, start=10)
    for j in range(3):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 10 + j, LATENT])))
        assert np.array_equal(rows[j].numpy(), rng.standard_normal((2, 4), dtype=np.float32))
    with offset(10):  # the context offset is the default start
        assert torch.equal(stream_normal((3, 2, 4), seed=5), rows)
    uniform = stream_normal((2, 3), seed=5, distribution="uniform")
    assert float(uniform.min()) >= 0 and float(uniform.max()) < 1
    # streams of one image are independent draws; seeds and indices never share a stream
    assert not np.array_equal(image_rng(5, 0, LATENT).random(4), image_rng(5, 0, CHOICE).random(4))
    assert not np.array_equal(image_rng(5, 1).random(4), image_rng(6, 0).random(4))
    assert step_stream(0) == 2
    with pytest.raises(GeneratorError, match="seed >= 0"):
        stream_normal((1, 2), seed=-1)


def _in_batches(generator, batch_size: int, n: int = N, seed: int = 3) -> tuple[np.ndarray, list]:
    images, labels = [], []
    for start in range(0, n, batch_size):
        batch = generate_range(generator, start, min(batch_size, n - start), seed)
        images.append(batch.images)
        labels += batch.labels
    return np.concatenate(images), labels


@pytest.mark.parametrize(("architecture", "style"), VARIANTS)
def test_images_do_not_depend_on_batch_size_or_n(tmp_path, architecture, style):
    generator = load_generator(make_tiny(tmp_path / "m", architecture, style=style))
    whole, labels = _in_batches(generator, N)
    for batch_size in (7, 64):
        images, batch_labels = _in_batches(generator, batch_size)
        assert batch_labels == labels
        # same latents; the network itself may round differently per batch size (< 1e-6)
        assert np.abs(images - whole).max() <= 1e-6, (batch_size, np.abs(images - whole).max())
    first = generator.generate(50, 3)
    assert np.abs(first.images - whole[:50]).max() <= 1e-6 and first.labels == labels[:50]
    assert np.abs(whole[1] - whole[0]).max() > 1e-4  # images differ from each other
    if generator.card.conditioning.labels:
        assert labels[:4] == ["healthy", "lesion", "healthy", "lesion"]


def _pngs(directory) -> np.ndarray:
    files = sorted(directory.glob("gen-*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_api_generate_dataloader_and_synthesize_match_at_any_batch_size(tmp_path, user_registry):
    make_tiny(user_registry / "cgan", "cgan")
    ref = "tiny/cgan-mednist"
    outs = {}
    for batch_size in (7, 64, 200):
        api.generate(ref, N, seed=3, output=tmp_path / f"b{batch_size}", fmt="png", batch_size=batch_size)
        outs[batch_size] = _pngs(tmp_path / f"b{batch_size}")
    assert outs[7].shape == (N, 16, 16)
    assert np.array_equal(outs[7], outs[200]) and np.array_equal(outs[64], outs[200])
    api.generate(ref, 50, seed=3, output=tmp_path / "n50", fmt="png")
    assert np.array_equal(_pngs(tmp_path / "n50"), outs[200][:50])
    names = sorted(p.name for p in (tmp_path / "b7").glob("gen-000000[0-3]_*.png"))
    assert [n.split("_")[1] for n in names] == ["healthy.png", "lesion.png", "healthy.png", "lesion.png"]

    expected = load_generator(user_registry / "cgan" / "card.yaml").generate(N, 3)
    for batch_size, workers in ((7, 0), (64, 2)):
        loader = api.get_dataloader(ref, length=N, batch_size=batch_size, seed=3)
        # spawn, not fork: forking a test process that runs Prefect's harness threads can kill the worker
        context = "spawn" if workers else None
        loader = torch.utils.data.DataLoader(
            loader.dataset, batch_size=batch_size, num_workers=workers, multiprocessing_context=context
        )
        images = torch.cat([x for x, _ in loader]).numpy()
        assert np.array_equal(images, expected.images), (batch_size, workers)

    generator = load_generator(user_registry / "cgan" / "card.yaml")
    plan = ShardPlan(index=0, seed=11, ids=tuple(f"r{i}" for i in range(20)), labels=("lesion",) * 20)
    shards = [np.concatenate([b.batch.images for b in generate_batches(generator, plan, bs)]) for bs in (3, 20)]
    assert np.array_equal(shards[0], shards[1])
