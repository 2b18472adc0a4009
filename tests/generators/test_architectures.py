"""The generator zoo: every architecture trains (loss falls on a fixed tiny set), resumes
from a checkpoint bit for bit, saves to safetensors, loads through ``LOADERS`` with its
sha256 checked, and generates float32 (N, C, H, W) in [0, 1], deterministic per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from generators.architectures import LOADERS
from generators.architectures.pix2pix import MaskCondition
from generators.card import ARCHITECTURES, Conditioning, ModelCard, Weights, load_card, save_card
from generators.compiled import CompiledOrEager, compile_generator, should_compile
from generators.errors import GeneratorError, IntegrityError
from generators.train_spec import TrainSpec
from generators.training import TrainedGenerator, TrainingData, train_generator
from generators.weights import save_weights

SIZE = 16
LABELS = ("disc", "square")
TINY = {"batch_size": 8, "latent_dim": 8, "base_channels": 8, "seed": 3}
# case -> (train block, history column that must fall, least relative drop early -> late)
CASES: dict[str, tuple[dict, str, float]] = {
    "cgan": ({"lr_discriminator": 1e-3}, "loss_d", 0.1),
    "cgan_masks": ({"with_masks": True, "lr_discriminator": 1e-3}, "loss_d", 0.1),
    "dcgan": ({"architecture": "dcgan", "lr_discriminator": 1e-3}, "loss_d", 0.1),
    "vae": ({"architecture": "vae", "lr_generator": 2e-3, "betas": (0.9, 0.999)}, "loss", 0.1),
    "ddpm": (
        {"architecture": "ddpm", "lr_generator": 2e-3, "betas": (0.9, 0.999), "timesteps": 100, "ddim_steps": 4},
        "loss",
        0.25,
    ),
    "pix2pix": ({"architecture": "pix2pix", "with_masks": True, "lr_generator": 2e-3}, "loss_l1", 0.08),
}
EPOCHS = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest single-threaded, above all on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def phantoms(n: int = 16) -> TrainingData:
    """Two classes of 16x16 phantoms, a disc and a square (+ noise), with their masks."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 4) ** 2).astype(np.float32)
    square = np.zeros((SIZE, SIZE), np.float32)
    square[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 1
    shapes = [disc if y == 0 else square for y in labels]
    images = np.stack([s * 0.8 + 0.1 * rng.random((SIZE, SIZE)) for s in shapes])[:, None].astype(np.float32)
    masks = np.stack(shapes).astype(np.int64)
    return TrainingData(images, labels.astype(np.int64), LABELS, masks, 2)


def spec_for(case: str, **overrides) -> TrainSpec:
    return TrainSpec(**{**TINY, "epochs": EPOCHS, **CASES[case][0], **overrides})


@pytest.fixture(scope="module")
def trained() -> dict[str, TrainedGenerator]:
    """One full tiny training run per case, shared by the tests (computed on first use)."""
    cache: dict[str, TrainedGenerator] = {}

    class Runs(dict):
        def __missing__(self, case: str) -> TrainedGenerator:
            cache[case] = train_generator(spec_for(case), phantoms())
            return cache[case]

    return Runs()


def card_for(result: TrainedGenerator, tmp_path, **fields) -> tuple[ModelCard, object]:
    """Write the weights and a card (round-tripped through YAML) as the train stage does."""
    weights = tmp_path / "weights.safetensors"
    sha = save_weights(result.state, weights)
    card = ModelCard(
        id=f"test/{result.architecture}",
        version="1",
        architecture=result.architecture,
        network=result.network,
        modality="MRI",
        anatomy="phantom",
        image_size=(SIZE, SIZE),
        channels=1,
        licence="MIT",
        conditioning=Conditioning(labels=result.labels, masks=result.mask_classes > 0),
        weights=Weights(file=weights.name, sha256=sha),
        **fields,
    )
    save_card(card, tmp_path / "card.yaml")
    return load_card(tmp_path / "card.yaml"), weights


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_loss_and_records_history(case, trained):
    result = trained[case]
    column, least_drop = CASES[case][1], CASES[case][2]
    assert [row["epoch"] for row in result.history] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(v) for row in result.history for v in row.values())
    early = np.mean([row[column] for row in result.history[:3]])
    late = np.mean([row[column] for row in result.history[-3:]])
    assert late < early - least_drop * abs(early), f"{case}: {column} {early:.4f} -> {late:.4f}"
    assert result.architecture in ARCHITECTURES


@pytest.mark.parametrize("case", CASES)
def test_training_resumes_from_a_checkpoint_bit_for_bit(case, tmp_path):
    data = phantoms()
    full = train_generator(spec_for(case, epochs=4), data)
    checkpoint = tmp_path / "run.ckpt"
    # a run that stops after epoch 2 leaves its checkpoint behind, as a crash would
    train_generator(spec_for(case, epochs=2, checkpoint_every=2), data, checkpoint=checkpoint)
    resumed = train_generator(spec_for(case, epochs=4, checkpoint_every=2), data, checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 2
    assert len(resumed.history) == len(full.history) == 4
    for row, expected in zip(resumed.history, full.history, strict=True):
        assert row == pytest.approx(expected, rel=1e-6)  # cgan checkpoints its history as float32
    assert resumed.state.keys() == full.state.keys()
    for key in full.state:
        torch.testing.assert_close(resumed.state[key], full.state[key], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_loaded_generator_meets_the_contract(case, trained, tmp_path):
    result = trained[case]
    card, weights = card_for(result, tmp_path)
    model = LOADERS[card.architecture](card, weights, "cpu")
    condition = None if case == "dcgan" else "square"
    first = model.generate(4, seed=11, condition=condition)
    again = model.generate(4, seed=11, condition=condition)
    other = model.generate(4, seed=12, condition=condition)
    assert first.images.shape == (4, 1, SIZE, SIZE) and first.images.dtype == np.float32
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    assert first.images.std() > 0  # not a constant image
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    if case == "dcgan":
        assert first.labels == [None] * 4 and first.masks is None
        return
    assert first.labels == ["square"] * 4
    assert not np.array_equal(model.generate(4, seed=11, condition="disc").images, first.images)
    if result.mask_classes:
        assert first.masks is not None and first.masks.shape == (4, SIZE, SIZE) and first.masks.dtype == np.int64
        assert set(np.unique(first.masks)) <= set(range(result.mask_classes))
        np.testing.assert_array_equal(first.masks, again.masks)
    else:
        assert first.masks is None


def test_loaders_cover_every_trainable_architecture():
    assert set(TrainSpec.model_fields["architecture"].annotation.__args__) <= set(LOADERS)
    assert set(LOADERS) <= set(ARCHITECTURES)


def test_loader_refuses_tampered_missing_or_mislabelled_weights(trained, tmp_path):
    card, weights = card_for(trained["vae"], tmp_path)
    with pytest.raises(GeneratorError, match="not available"):
        LOADERS["vae"](card, None, "cpu")
    with pytest.raises(GeneratorError, match="value_range"):
        LOADERS["vae"](card.model_copy(update={"value_range": (-1.0, 1.0)}), weights, "cpu")
    with pytest.raises(GeneratorError, match="LOADERS\\['vae'\\]"):
        LOADERS["ddpm"](card, weights, "cpu")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="sha256"):
        LOADERS["vae"](card, weights, "cpu")


def test_pix2pix_translates_given_masks_and_draws_from_its_pool(trained, tmp_path):
    result = trained["pix2pix"]
    assert result.state["mask_pool.masks"].shape == (16, SIZE, SIZE)  # mask_pool_size 64 > 16 images
    card, weights = card_for(result, tmp_path)
    model = LOADERS["pix2pix"](card, weights, "cpu")
    masks = phantoms().masks[:3]
    batch = model.generate(3, seed=0, condition=MaskCondition(masks, ["disc", "square", "disc"]))
    np.testing.assert_array_equal(batch.masks, masks)
    assert batch.labels == ["disc", "square", "disc"]
    bare = model.generate(3, seed=0, condition=masks)  # a bare array: labels cycle
    assert bare.labels == ["disc", "square", "disc"]
    np.testing.assert_array_equal(bare.images, batch.images)
    # pool masks come from training images of the requested label (discs are the smaller shape)
    discs = model.generate(4, seed=5, condition="disc").masks
    squares = model.generate(4, seed=5, condition="square").masks
    assert discs.sum() < squares.sum()
    with pytest.raises(GeneratorError, match="mask values"):
        model.generate(3, seed=0, condition=masks + 2)
    with pytest.raises(GeneratorError, match="expected 2 masks"):
        model.generate(2, seed=0, condition=masks)
    model.use_mask_pool(masks[:1], ["disc"])
    with pytest.raises(GeneratorError, match="no mask for label 'square'"):
        model.generate(1, seed=0, condition="square")


def test_dcgan_refuses_labels_it_was_not_conditioned_on(trained, tmp_path):
    card, weights = card_for(trained["dcgan"], tmp_path)
    model = LOADERS["dcgan"](card, weights, "cpu")
    with pytest.raises(GeneratorError, match="unconditional"):
        model.generate(2, seed=0, condition="disc")


def test_train_spec_names_inconsistent_settings():
    with pytest.raises(ValidationError, match="with_masks: true"):
        TrainSpec(architecture="pix2pix")
    with pytest.raises(ValidationError, match="with_masks is supported by cgan, pix2pix"):
        TrainSpec(architecture="vae", with_masks=True)
    with pytest.raises(ValidationError, match="ddim_steps"):
        TrainSpec(architecture="ddpm", timesteps=10, ddim_steps=20)
    assert TrainSpec().architecture == "cgan" and TrainSpec().betas == (0.5, 0.999)  # defaults kept


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    """One torchrun-like rank on CPU (gloo): trains the vae on its half of the phantoms."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        spec = TrainSpec(**{**TINY, "epochs": 3, **CASES["vae"][0]})
        result = train_generator(spec, phantoms(), checkpoint=Path(tmp) / "ddp.ckpt")
        save_weights(result.state, Path(tmp) / f"rank{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_training_keeps_the_ranks_in_step(tmp_path):
    """Each rank sees different images; only averaged gradients keep the weights equal."""
    # spawn, not fork: in a full test session other threads are running (the session's
    # Prefect test server), and a forked child inherits their locks half-held and dies
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    single = train_generator(TrainSpec(**{**TINY, "epochs": 3, **CASES["vae"][0]}), phantoms())
    assert (tmp_path / "ddp.ckpt").is_file()  # written by rank 0
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    assert any(not torch.equal(ranks[0][k], single.state[k]) for k in ranks[0])  # it did run sharded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_trains_and_generates_on_cuda_with_bf16_autocast(case, tmp_path):
    result = train_generator(spec_for(case, epochs=2), phantoms(), device="cuda")
    assert all(np.isfinite(v) for row in result.history for v in row.values())
    card, weights = card_for(result, tmp_path)
    model = LOADERS[card.architecture](card, weights, "cuda")
    condition = None if case == "dcgan" else "disc"
    first, again = (model.generate(4, seed=5, condition=condition) for _ in range(2))
    assert first.images.shape == (4, 1, SIZE, SIZE) and first.images.dtype == np.float32
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    np.testing.assert_allclose(first.images, again.images, atol=1e-3)


@pytest.mark.parametrize("case", ["cgan", "vae"])
def test_compiled_generation_matches_eager(case, trained, tmp_path):
    """``torch.compile`` of the hot network method (real inductor compile): the same
    images as eager up to float32 rounding, still deterministic per seed."""
    card, weights = card_for(trained[case], tmp_path)
    eager = LOADERS[card.architecture](card, weights, "cpu")
    compiled = LOADERS[card.architecture](card, weights, "cpu")
    assert compile_generator(compiled)
    expected = eager.generate(6, seed=5, condition="square")
    first = compiled.generate(6, seed=5, condition="square")
    np.testing.assert_allclose(first.images, expected.images, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(compiled.generate(6, seed=5, condition="square").images, first.images)
    assert first.labels == expected.labels
    hot = getattr(compiled.module, "decode" if case == "vae" else "forward")
    assert isinstance(hot, CompiledOrEager) and hot.proven and hot.compiled is not None


def test_a_failing_compile_falls_back_to_eager_with_one_warning(trained, tmp_path, monkeypatch, caplog):
    """Unit test with a stand-in for torch.compile (the real compile is tested above)."""
    import generators.compiled as compiled_module

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nlong details")

        return run

    card, weights = card_for(trained["cgan"], tmp_path)
    eager = LOADERS["cgan"](card, weights, "cpu")
    model = LOADERS["cgan"](card, weights, "cpu")
    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    assert compile_generator(model)
    with caplog.at_level("WARNING", logger="generators.compiled"):
        out = model.generate(3, seed=1, condition="disc")
        again = model.generate(3, seed=2, condition="disc")
    np.testing.assert_array_equal(out.images, eager.generate(3, seed=1, condition="disc").images)
    np.testing.assert_array_equal(again.images, eager.generate(3, seed=2, condition="disc").images)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1
    assert "no C++ compiler found" in warnings[0] and "long details" not in warnings[0]
    assert "synthesis.compile: false" in warnings[0]


def test_auto_compile_depends_on_architecture_and_image_count():
    assert not should_compile("auto", "cgan", 19_999, 20_000)
    assert should_compile("auto", "cgan", 20_000, 20_000)
    assert not should_compile("auto", "ddpm", 10**6, 20_000)  # measured no faster compiled
    assert should_compile(True, "ddpm", 1, 20_000)
    assert not should_compile(False, "cgan", 10**6, 20_000)
