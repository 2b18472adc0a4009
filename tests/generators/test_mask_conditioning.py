"""Mask-conditioned generation (``generators.contract.MaskConditionedGenerator``): the ddpm
with ``with_masks: true`` (one-hot mask concatenated to the noisy image) and pix2pix make
images FOR given masks and return those masks unchanged; without masks they draw from the
pool stored with their weights; generators that are not mask-conditioned refuse masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.architectures import LOADERS
from generators.architectures.ddpm import DdpmConfig
from generators.contract import accepts_masks, generate_batch
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import train_generator
from tests.generators.test_architectures import SIZE, TINY, card_for, phantoms

DDPM = {"architecture": "ddpm", "lr_generator": 2e-3, "betas": (0.9, 0.999), "timesteps": 100, "ddim_steps": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddpm_masks():
    return train_generator(TrainSpec(**{**TINY, **DDPM, "epochs": 12, "with_masks": True}), phantoms())


def test_mask_conditioned_ddpm_learns_and_stores_a_pool(ddpm_masks):
    early = np.mean([row["loss"] for row in ddpm_masks.history[:3]])
    late = np.mean([row["loss"] for row in ddpm_masks.history[-3:]])
    assert late < 0.75 * early, (early, late)
    assert ddpm_masks.mask_classes == 2 and ddpm_masks.network["mask_classes"] == 2
    assert ddpm_masks.state["mask_pool.masks"].shape == (16, SIZE, SIZE)
    # the UNet reads the noisy image and the one-hot mask: 1 + 2 input channels
    assert ddpm_masks.state["conv_in.conv.weight"].shape[1] == 3


def test_ddpm_returns_the_given_masks_and_follows_them(ddpm_masks, tmp_path):
    card, weights = card_for(ddpm_masks, tmp_path)
    model = LOADERS["ddpm"](card, weights, "cpu")
    assert accepts_masks(model) and model.mask_classes == 2
    masks = phantoms().masks[:4]
    batch = generate_batch(model, 4, 7, ["disc", "square", "disc", "square"], masks=masks)
    np.testing.assert_array_equal(batch.masks, masks)
    assert batch.masks.dtype == np.int64 and batch.images.shape == (4, 1, SIZE, SIZE)
    again = model.generate(4, 7, ["disc", "square", "disc", "square"], masks=masks)
    np.testing.assert_array_equal(again.images, batch.images)  # deterministic per seed
    # the mask changes the image: the same noise with another mask gives another image
    swapped = model.generate(4, 7, ["disc", "square", "disc", "square"], masks=masks[::-1].copy())
    assert np.abs(swapped.images - batch.images).mean() > 1e-3
    # no masks: drawn from the pool by label, returned with the images
    pooled = model.generate(4, 5, "square")
    assert pooled.masks.shape == (4, SIZE, SIZE) and set(np.unique(pooled.masks)) <= {0, 1}
    with pytest.raises(GeneratorError, match=r"mask values must lie in \[0, 2\)"):
        model.generate(4, 0, "disc", masks=masks + 1)
    with pytest.raises(GeneratorError, match="expected 3 masks, got 4"):
        model.generate(3, 0, "disc", masks=masks)
    with pytest.raises(GeneratorError, match=r"expected integer masks \(N, 16, 16\)"):
        model.generate(4, 0, "disc", masks=masks.astype(np.float32))


def test_class_conditional_ddpm_refuses_masks(tmp_path):
    result = train_generator(TrainSpec(**{**TINY, **DDPM, "epochs": 1}), phantoms())
    card, weights = card_for(result, tmp_path)
    model = LOADERS["ddpm"](card, weights, "cpu")
    assert not accepts_masks(model) and model.generate(2, 0, "disc").masks is None
    masks = np.zeros((2, SIZE, SIZE), np.int64)
    with pytest.raises(GeneratorError, match="architecture 'ddpm' is not mask-conditioned"):
        generate_batch(model, 2, 0, "disc", masks=masks)
    with pytest.raises(GeneratorError, match="not mask-conditioned .* retrain with with_masks: true"):
        model.generate(2, 0, "disc", masks=masks)


def test_old_ddpm_cards_without_mask_classes_still_load():
    old = {"image_size": 16, "channels": 1, "n_labels": 2, "unet_channels": [8, 16], "attention_levels": [False, True]}
    assert DdpmConfig(**old).mask_classes == 0
    with pytest.raises(GeneratorError, match="mask_classes must be 0"):
        DdpmConfig(**old, mask_classes=1)


def test_pix2pix_takes_masks_through_the_contract(tmp_path):
    spec = TrainSpec(**{**TINY, "architecture": "pix2pix", "with_masks": True, "epochs": 1})
    card, weights = card_for(train_generator(spec, phantoms()), tmp_path)
    model = LOADERS["pix2pix"](card, weights, "cpu")
    masks = phantoms().masks[:3]
    batch = generate_batch(model, 3, 0, ["disc", "square", "disc"], masks=masks)
    np.testing.assert_array_equal(batch.masks, masks)
    # image i's noise depends on (seed, i) only: a batch of 3 starts like a batch of 1
    # (up to float rounding of batched convolutions)
    first = model.generate(1, 0, ["disc"], masks=masks[:1])
    np.testing.assert_allclose(first.images[0], batch.images[0], atol=1e-5)
