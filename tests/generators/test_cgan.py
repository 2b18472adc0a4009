"""Conditional GAN: shapes, value range, determinism, training progress, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.architectures.cgan import (
    CganConfig,
    CganModel,
    ConditionalDiscriminator,
    ConditionalGenerator,
    train_cgan,
)
from generators.card import Conditioning, ModelCard, Weights
from generators.errors import DataError, GeneratorError
from generators.training import TrainingData, TrainSpec, train_generator


def _data(n: int = 16, size: int = 16, masks: bool = False) -> TrainingData:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)
    square = np.zeros((size, size), np.float32)
    square[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    images = np.stack([(disc if y == 0 else square) * 0.8 + 0.1 * rng.random((size, size)) for y in labels])
    mask = None
    if masks:
        mask = np.stack([(disc if y == 0 else square).astype(np.int64) for y in labels])
    return TrainingData(images[:, None].astype(np.float32), labels, ("disc", "square"), mask, 2 if masks else 0)


def _card(cfg: CganConfig, labels: tuple[str, ...]) -> ModelCard:
    return ModelCard(
        id="test/cgan",
        version="1",
        architecture="cgan",
        network=cfg.__dict__,
        modality="MRI",
        anatomy="phantom",
        image_size=(cfg.image_size, cfg.image_size),
        channels=cfg.channels,
        licence="MIT",
        conditioning=Conditioning(labels=labels, masks=cfg.mask_classes > 0),
        weights=Weights(file="w", sha256="0"),
    )


def test_networks_have_the_declared_shapes():
    cfg = CganConfig(image_size=32, channels=1, n_labels=3, latent_dim=8, base_channels=8, mask_classes=2)
    gen, disc = ConditionalGenerator(cfg), ConditionalDiscriminator(cfg)
    onehot = torch.eye(3)[[0, 1, 2, 0]]
    raw = gen(torch.randn(4, 8), onehot)
    assert raw.shape == (4, 3, 32, 32)  # 1 image channel + 2 mask logits
    assert disc(torch.rand(4, 3, 32, 32), onehot).shape == (4,)


def test_generate_is_deterministic_in_range_and_conditioned():
    cfg = CganConfig(image_size=16, channels=1, n_labels=2, latent_dim=8, base_channels=8)
    torch.manual_seed(0)
    model = CganModel(_card(cfg, ("a", "b")), ConditionalGenerator(cfg).state_dict())
    first = model.generate(6, seed=3, condition="b")
    again = model.generate(6, seed=3, condition="b")
    other = model.generate(6, seed=4, condition="b")
    assert first.images.shape == (6, 1, 16, 16) and first.images.dtype == np.float32
    assert first.images.min() >= 0.0 and first.images.max() <= 1.0
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert first.labels == ["b"] * 6
    with pytest.raises(GeneratorError, match="unknown label"):
        model.generate(2, seed=0, condition="c")


def test_paired_generator_emits_masks_of_known_classes():
    cfg = CganConfig(image_size=16, channels=1, n_labels=2, latent_dim=8, base_channels=8, mask_classes=3)
    model = CganModel(_card(cfg, ("a", "b")), ConditionalGenerator(cfg).state_dict())
    batch = model.generate(4, seed=0)
    assert batch.masks is not None and batch.masks.shape == (4, 16, 16)
    assert set(np.unique(batch.masks)) <= {0, 1, 2}


def test_training_reduces_the_discriminator_loss_and_is_deterministic():
    data = _data()
    spec = TrainSpec(epochs=12, batch_size=8, latent_dim=8, base_channels=8, seed=1, lr_discriminator=1e-3)
    first = train_cgan(data, spec)
    again = train_cgan(data, spec)
    assert len(first.history) == 12
    early = np.mean([h["loss_d"] for h in first.history[:3]])
    late = np.mean([h["loss_d"] for h in first.history[-3:]])
    assert late < early - 0.2
    for key in first.state:
        torch.testing.assert_close(first.state[key], again.state[key], rtol=0, atol=0)


def test_training_resumes_from_a_checkpoint_with_identical_result(tmp_path):
    data = _data()
    full = train_cgan(data, TrainSpec(epochs=4, batch_size=8, latent_dim=8, base_channels=8))
    checkpoint = tmp_path / "ckpt.pt"
    # "crash" after epoch 2: a run that stops at 2 epochs leaves the checkpoint behind
    train_cgan(
        data,
        TrainSpec(epochs=2, batch_size=8, latent_dim=8, base_channels=8, checkpoint_every=2),
        checkpoint=checkpoint,
    )
    resumed = train_cgan(
        data,
        TrainSpec(epochs=4, batch_size=8, latent_dim=8, base_channels=8, checkpoint_every=2),
        checkpoint=checkpoint,
    )
    assert resumed.resumed_from_epoch == 2
    for key in full.state:
        torch.testing.assert_close(full.state[key], resumed.state[key], rtol=0, atol=0)


def test_paired_training_runs_with_masks():
    data = _data(masks=True)
    result = train_generator(TrainSpec(epochs=2, batch_size=8, latent_dim=8, base_channels=8, with_masks=True), data)
    assert result.architecture == "cgan" and result.mask_classes == 2 and result.network["mask_classes"] == 2
    assert result.labels == ("disc", "square")
    with pytest.raises(DataError, match="with_masks is true but the training images have no masks"):
        train_cgan(_data(), TrainSpec(epochs=1, batch_size=8, latent_dim=8, base_channels=8, with_masks=True))


def test_training_data_rejects_bad_shapes():
    with pytest.raises(DataError, match="square"):
        TrainingData(np.zeros((2, 1, 8, 16), np.float32), np.zeros(2, np.int64), ("a",))
    with pytest.raises(DataError, match="one label per image"):
        TrainingData(np.zeros((2, 1, 8, 8), np.float32), np.zeros(3, np.int64), ("a",))


def test_upsample_style_trains_loads_from_its_card_and_exports_as_torchscript(tmp_path):
    """The 'upsample' style: masks included, its card's network records the style (so the
    weights load into the same network), resume is exact, and export takes TorchScript
    (it is not a MONAI network) with output equal to ``generate``."""
    from generators.architectures.cgan import network_kwargs
    from generators.torchscript import export_torchscript

    data = _data(masks=True)
    spec = TrainSpec(epochs=2, batch_size=8, latent_dim=8, base_channels=4, with_masks=True, cgan_style="upsample")
    result = train_cgan(data, spec)
    assert result.network["style"] == "upsample"
    assert "style" not in network_kwargs(CganConfig(image_size=16, channels=1, n_labels=2))  # old cards unchanged
    cfg = CganConfig(**result.network)
    card = _card(cfg, ("disc", "square"))
    model = CganModel(card, result.state)
    batch = model.generate(4, seed=0)
    assert batch.images.shape == (4, 1, 16, 16) and batch.masks.shape == (4, 16, 16)
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    with pytest.raises(GeneratorError, match="weights"):  # the same weights do not fit the other style
        CganModel(
            _card(CganConfig(**{**result.network, "style": "mednist"}), ("disc", "square")),
            result.state,
        )
    out = export_torchscript(model, tmp_path / "ts")
    scripted = torch.jit.load(str(out))
    from generators.architectures.cgan import latent

    z = latent(4, cfg.latent_dim, 0)
    images = scripted(z, torch.arange(4) % 2)[:, :1]
    np.testing.assert_allclose(images.detach().numpy(), batch.images, atol=1e-5)


def test_upsample_style_refuses_a_size_not_divisible_by_16():
    with pytest.raises(GeneratorError, match="divisible by 16"):
        CganConfig(image_size=24, channels=1, n_labels=2, style="upsample")
    with pytest.raises(GeneratorError, match="style"):
        CganConfig(image_size=16, channels=1, n_labels=2, style="fancy")


def test_train_stage_card_keeps_the_cgan_fields():
    """The one ``_train_architecture`` path writes cgan's own name, description (network
    style and the loss actually used) and tags."""
    from generators.training import TrainedGenerator
    from tasks.train import _NAMES, _TAGS, _describe

    def trained(**network) -> TrainedGenerator:
        return TrainedGenerator("cgan", {}, {"image_size": 16, **network}, ("a",), 0, [], 0.0, 0)

    assert _describe(trained(), TrainSpec(), "demo") == (
        "Class-conditional GAN (MONAI Generator/Discriminator, hinge loss, EMA generator) "
        "trained by synthmed pipeline 'demo'."
    )  # the shipped mni152_cgan card's description, word for word
    upsample = _describe(trained(style="upsample"), TrainSpec(loss="bce"), "p")
    assert "projection discriminator, bce loss" in upsample
    assert _NAMES["cgan"] == "class-conditional GAN" and _TAGS["cgan"] == ("conditional", "gan")
