"""Latent diffusion (``ldm``) on CI-sized networks: it trains (both stages through ``fit``),
loads through ``LOADERS`` and generates float32 (N, C, H, W) in [0, 1], deterministic per
seed and conditioned on the label; its sampling loop equals MONAI's scheduler steps; the
autoencoder is cached apart from the diffusion stage; both stages resume from checkpoints;
and the train stage of a real pipeline (Prefect flow, CLI) trains, caches and ships it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler
from pydantic import ValidationError

from generators.architectures import LOADERS
from generators.architectures.ldm import (
    CACHE_FOLDER,
    LdmConfig,
    LdmSampler,
    sample_latents,
    sampling_plan,
)
from generators.card import load_card
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import TrainedGenerator, train_generator
from tests.generators.test_architectures import SIZE, card_for, phantoms

# 16x16 phantoms -> 8x8 latents (two autoencoder levels), UNet widths (8, 16)
TINY = {
    "architecture": "ldm",
    "batch_size": 8,
    "base_channels": 8,
    "autoencoder_channels": (8, 16),
    "latent_channels": 2,
    "autoencoder_epochs": 6,
    "autoencoder_lr": 3e-3,
    "epochs": 6,
    "lr_generator": 2e-3,
    "betas": (0.9, 0.999),
    "timesteps": 100,
    "sample_steps": 4,
    "seed": 3,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest single-threaded, above all on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec(**overrides) -> TrainSpec:
    return TrainSpec(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedGenerator:
    return train_generator(spec(), phantoms(), checkpoint=tmp_path_factory.mktemp("ldm") / "run.ckpt")


class _Velocity(torch.nn.Module):
    """A fixed random stand-in for the UNet (the schedulers' arithmetic is under test)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, timesteps, class_labels=None):
        return self.conv(x) * (1 + timesteps[:, None, None, None] / 1000) + class_labels[:, None, None, None]


@pytest.mark.parametrize("sampler", ["rflow", "ddim"])
def test_the_sampling_loop_equals_monai_scheduler_steps(sampler):
    net, steps, timesteps = _Velocity(), 5, 100
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    plan = sampling_plan(sampler, timesteps, steps)
    ours = sample_latents(net, noise, labels, plan.timesteps, plan.coef_x, plan.coef_out)
    if sampler == "rflow":
        scheduler = RFlowScheduler(num_train_timesteps=timesteps, use_discrete_timesteps=True)
        scheduler.set_timesteps(steps)
        following = [*scheduler.timesteps[1:].tolist(), 0]
    else:
        scheduler = DDIMScheduler(num_train_timesteps=timesteps, schedule="cosine", clip_sample=False)
        scheduler.set_timesteps(steps)
    z = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = net(z, t.expand(3).float(), class_labels=labels)
            z = scheduler.step(out, t, z, following[i])[0] if sampler == "rflow" else scheduler.step(out, int(t), z)[0]
    torch.testing.assert_close(ours.detach(), z, rtol=1e-4, atol=1e-4)  # float32 order of operations
    assert plan.timesteps.shape == (steps,) and plan.timesteps.dtype == torch.float32


def test_ldm_trains_and_meets_the_generator_contract(trained, tmp_path):
    assert [row["epoch"] for row in trained.history] == list(range(1, 7))
    assert all(np.isfinite(row["loss"]) for row in trained.history)
    assert {k.split(".")[0] for k in trained.state} == {"autoencoder", "unet"}
    assert 0.05 < trained.network["scale_factor"] < 50  # 1 / std of the latents, measured
    card, weights = card_for(trained, tmp_path)
    model = LOADERS["ldm"](card, weights, "cpu")
    first = model.generate(4, seed=11, condition="square")
    again = model.generate(4, seed=11, condition="square")
    other = model.generate(4, seed=12, condition="square")
    assert first.images.shape == (4, 1, SIZE, SIZE) and first.images.dtype == np.float32
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0 and first.images.std() > 0
    assert first.labels == ["square"] * 4 and first.masks is None
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert not np.array_equal(model.generate(4, seed=11, condition="disc").images, first.images)
    assert model.generate(3, seed=0).labels == ["disc", "square", "disc"]
    model.sample_steps = 2  # fewer steps: another (coarser) sample of the same noise
    assert not np.array_equal(model.generate(4, seed=11, condition="square").images, first.images)
    with pytest.raises(GeneratorError, match="unknown label"):
        model.generate(1, seed=0, condition="triangle")


def test_sampler_module_traces_for_export(trained, tmp_path):
    """``LdmSampler`` (what an export wraps) gives the model's images from the same noise."""
    card, weights = card_for(trained, tmp_path)
    model = LOADERS["ldm"](card, weights, "cpu")
    cfg = LdmConfig(**trained.network)
    noise = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        traced = torch.jit.trace(model.module, (noise, labels), check_trace=False)
        torch.testing.assert_close(traced(noise, labels), model.module(noise, labels))
    assert isinstance(model.module, LdmSampler)


def test_ddim_sampler_trains_and_generates(tmp_path):
    result = train_generator(spec(sampler="ddim", epochs=2, autoencoder_epochs=2), phantoms())
    assert result.network["sampler"] == "ddim"
    card, weights = card_for(result, tmp_path)
    images = LOADERS["ldm"](card, weights, "cpu").generate(2, seed=0, condition="disc").images
    assert images.shape == (2, 1, SIZE, SIZE) and 0.0 <= images.min() and images.max() <= 1.0


def test_the_autoencoder_is_cached_apart_from_the_diffusion_settings(tmp_path, caplog):
    data, checkpoint = phantoms(), tmp_path / "run.ckpt"
    base = dict(epochs=2, autoencoder_epochs=3)
    first = train_generator(spec(**base), data, checkpoint=checkpoint)
    cached = sorted((tmp_path / CACHE_FOLDER).glob("*.safetensors"))
    assert len(cached) == 1 and not list((tmp_path / CACHE_FOLDER).glob("*.ckpt"))  # stage checkpoint dropped
    meta = json.loads(cached[0].with_suffix(".json").read_text())
    assert len(meta["history"]) == 3 and meta["scale_factor"] == first.network["scale_factor"]
    stamp = cached[0].stat().st_mtime_ns
    checkpoint.unlink()  # the train stage drops the diffusion checkpoint after a run
    with caplog.at_level("INFO", logger="generators.architectures.ldm"):
        changed = train_generator(spec(**base, lr_generator=1e-3, sample_steps=3), data, checkpoint=checkpoint)
    assert any("reusing the cached autoencoder" in r.getMessage() for r in caplog.records)
    assert cached[0].stat().st_mtime_ns == stamp
    for key in first.state:
        if key.startswith("autoencoder."):
            torch.testing.assert_close(changed.state[key], first.state[key], rtol=0, atol=0)
    assert any(not torch.equal(changed.state[k], first.state[k]) for k in first.state if k.startswith("unet."))
    # an autoencoder setting trains (and caches) another autoencoder
    checkpoint.unlink()
    train_generator(spec(**base, autoencoder_lr=1e-3), data, checkpoint=checkpoint)
    assert len(list((tmp_path / CACHE_FOLDER).glob("*.safetensors"))) == 2


def test_a_damaged_cached_autoencoder_is_retrained(tmp_path, caplog):
    data, checkpoint = phantoms(), tmp_path / "run.ckpt"
    first = train_generator(spec(epochs=1, autoencoder_epochs=2), data, checkpoint=checkpoint)
    (cached,) = (tmp_path / CACHE_FOLDER).glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    checkpoint.unlink()
    with caplog.at_level("WARNING", logger="generators.architectures.ldm"):
        again = train_generator(spec(epochs=1, autoencoder_epochs=2), data, checkpoint=checkpoint)
    assert any("unusable cached autoencoder" in r.getMessage() for r in caplog.records)
    for key in first.state:  # retrained from the same seed: the same weights
        torch.testing.assert_close(again.state[key], first.state[key], rtol=0, atol=0)


def test_both_stages_resume_from_their_checkpoints_bit_for_bit(tmp_path):
    data = phantoms()
    full = train_generator(spec(epochs=4, autoencoder_epochs=4), data)
    # a run stopping after diffusion epoch 2 leaves its checkpoint behind (its autoencoder is cached)
    checkpoint = tmp_path / "run.ckpt"
    train_generator(spec(epochs=2, autoencoder_epochs=4, checkpoint_every=2), data, checkpoint=checkpoint)
    resumed = train_generator(spec(epochs=4, autoencoder_epochs=4, checkpoint_every=2), data, checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 2
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in full.history], rel=1e-6)
    for key in full.state:
        torch.testing.assert_close(resumed.state[key], full.state[key], rtol=0, atol=0)


def test_an_interrupted_autoencoder_stage_resumes(tmp_path, monkeypatch):
    """Stop the autoencoder stage after its epoch-2 checkpoint (an exception from the epoch
    callback, as a crash); the rerun resumes it at epoch 2 and ends where an uninterrupted run does."""
    import generators.architectures.ldm as ldm

    data = phantoms()
    full = train_generator(spec(epochs=1, autoencoder_epochs=4), data)

    class Crash(Exception):
        pass

    original = ldm.fit

    def crashing_fit(recipe, data, stage, **kwargs):
        if recipe.sampler == "autoencoder":

            def stop(epoch, row):
                if epoch == 3:
                    raise Crash

            kwargs["on_epoch"] = stop
        return original(recipe, data, stage, **kwargs)

    monkeypatch.setattr(ldm, "fit", crashing_fit)
    with pytest.raises(Crash):
        train_generator(spec(epochs=1, autoencoder_epochs=4, checkpoint_every=2), data, checkpoint=tmp_path / "r.ckpt")
    assert len(list((tmp_path / CACHE_FOLDER).glob("*.ckpt"))) == 1
    monkeypatch.setattr(ldm, "fit", original)
    resumed = train_generator(
        spec(epochs=1, autoencoder_epochs=4, checkpoint_every=2), data, checkpoint=tmp_path / "r.ckpt"
    )
    meta = json.loads(next((tmp_path / CACHE_FOLDER).glob("*.json")).read_text())
    assert len(meta["history"]) == 4
    for key in full.state:
        torch.testing.assert_close(resumed.state[key], full.state[key], rtol=0, atol=0)


def test_inconsistent_ldm_settings_are_named():
    with pytest.raises(ValidationError, match="sample_steps"):
        TrainSpec(architecture="ldm", timesteps=10, sample_steps=20)
    with pytest.raises(GeneratorError, match="autoencoder levels"):
        LdmConfig.for_images(18, 1, 2, spec(autoencoder_channels=(8, 16, 16)))
    with pytest.raises(GeneratorError, match="multiples of 8"):
        LdmConfig.for_images(16, 1, 2, spec(autoencoder_channels=(12, 16)))
    with pytest.raises(GeneratorError, match="sampler"):
        sampling_plan("euler", 100, 4)


@pytest.mark.integration
def test_a_pipeline_trains_caches_and_synthesises_with_ldm(prefect_harness, tmp_path):
    from flows.cli import main
    from tests.flows.project import TINY as TINY_PIPELINE
    from tests.flows.project import make_project

    train = {
        **TINY_PIPELINE["generator"]["train"],
        **{k: v for k, v in TINY.items() if k not in ("seed",)},
        "autoencoder_epochs": 2,
        "epochs": 2,
    }
    train["autoencoder_channels"] = list(train["autoencoder_channels"])
    train["betas"] = list(train["betas"])
    config = make_project(tmp_path / "proj", overrides={"generator": {"train": train}})
    assert main(["run", "--pipeline", "tiny", "--config", str(config), "--no-dvc"]) == 0
    root = config.parent
    card = load_card(root / "models" / "tiny" / "generator" / "card.yaml")
    assert card.architecture == "ldm" and "einops" in card.dependencies
    assert card.network["sampler"] == "rflow" and card.network["scale_factor"] > 0
    state = root / ".synthmed" / "tiny"
    assert len(list((state / CACHE_FOLDER).glob("*.safetensors"))) == 1  # kept for the next run
    assert not list(state.glob("generator-*.ckpt"))  # the diffusion checkpoint is dropped
    history = (root / "models" / "tiny" / "generator" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss" and len(history) == 3
