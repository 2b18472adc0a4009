"""Interoperability: the shipped MedNIST GAN bundle, MONAI bundle import/export (run by
MONAI's own bundle runner), TorchScript round trips without synthmed, medigan import and
visualisation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flows.cli import main as cli_main
from generators import registry
from generators.api import get_generator
from generators.bundle_import import import_bundle, install_bundle
from generators.card import ModelCard, Weights, load_card, save_card
from generators.errors import GeneratorError
from generators.medigan import import_medigan
from generators.registry import Entry, load_generator
from generators.shards import decode_image, read_table, sha256_file
from generators.torchscript import embedded_card, export_torchscript, import_torchscript
from generators.visualise import PAD, interpolation_grid, to_display, visualise
from generators.weights import save_weights
from tests.generators.tiny_models import tiny_cgan_card

ZOO = Path(registry.__file__).parent / "zoo"
MEDNIST = ZOO / "mednist_gan"

MEDIGAN_JSON = ZOO / "medigan" / "global.json"  # medigan's index (MIT), shipped with its cards


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch) -> Path:
    """Keep ~/.synthmed out of the tests: the user registry is a fresh temp dir."""
    path = tmp_path / "user-registry"
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(path))
    return path


def make_cgan(directory: Path, *, masks: int = 0, card_id: str = "t/cgan", seed: int = 0) -> Entry:
    """A tiny seeded conditional GAN (16x16, 2 labels, optional mask classes) as card + weights."""
    return Entry(tiny_cgan_card(directory, card_id=card_id, masks=masks, seed=seed), directory / "card.yaml")


def poisoned_path(tmp_path: Path) -> Path:
    """A PYTHONPATH entry whose synthmed packages raise on import: proves a subprocess
    never imports synthmed (the editable install would otherwise make it importable)."""
    root = tmp_path / "poison"
    for name in ("generators", "flows", "tasks"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name}: synthmed must not be imported here')\n")
    return root


def run_isolated(args: list[str], tmp_path: Path, timeout_s: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(poisoned_path(tmp_path))}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def read_pngs(directory: Path, postfix: str) -> np.ndarray:
    files = sorted(directory.glob(f"*_{postfix}.png"), key=lambda p: int(p.name.split("_")[0]))
    return np.stack([np.asarray(Image.open(f)) for f in files])


# ---------------------------------------------------------------- the shipped MedNIST GAN


def test_mednist_hand_generates_upright_hands_deterministically():
    generator = get_generator("mednist-gan-hand")
    batch = generator.generate(8, seed=3)
    images = batch.images
    assert images.shape == (8, 1, 64, 64) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert batch.labels == [None] * 8 and batch.masks is None
    assert np.array_equal(images, generator.generate(8, seed=3).images)
    assert np.abs(images - generator.generate(8, seed=4).images).max() > 0.1
    # MedNIST hands are upright: a bright wrist at the bottom centre, dark top and sides
    mean = images[:, 0].mean(axis=0)
    wrist, top, side = mean[52:, 24:40].mean(), mean[:12, 24:40].mean(), mean[24:40, 52:].mean()
    assert wrist > 3 * top and wrist > 3 * side
    with pytest.raises(GeneratorError, match="unconditional"):
        generator.generate(2, seed=0, condition="hand")


def test_mednist_card_credits_source_licence_and_hash():
    entry = registry.find("mednist-gan-hand")
    card = entry.card
    assert entry.path == MEDNIST / "card.yaml"
    assert card.licence == "Apache-2.0" and card.training.dataset_licence == "CC BY-SA 4.0"
    assert "Erickson" in card.training.dataset and "MONAI" in card.origin.authors
    assert card.origin.kind == "monai_bundle" and "model-zoo" in card.origin.url
    assert card.weights.format == "torch" and card.weights.sha256 == sha256_file(entry.weights_path)
    assert "Apache License" in (MEDNIST / "LICENSE").read_text()
    assert "CC BY-SA 4.0" in (MEDNIST / "docs" / "data_license.txt").read_text()
    # the card is what import_bundle reads from the bundle itself (no code run)
    fresh = import_bundle(MEDNIST, card_id=card.id, modality="X-ray", anatomy="hand", latent_distribution="normal")
    for field in ("version", "network", "image_size", "channels", "value_range", "latent_dim", "weights"):
        assert getattr(fresh, field) == getattr(card, field), field


def test_mednist_cli_generate_png_and_parquet(tmp_path, capsys):
    assert (
        cli_main(
            [
                "generators",
                "generate",
                "mednist-gan-hand",
                "-n",
                "3",
                "--seed",
                "1",
                "--format",
                "png",
                "--output",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == 3
    first = np.asarray(Image.open(files[0]))
    assert first.shape == (64, 64) and first.dtype == np.uint8
    expected = get_generator("mednist-gan-hand").generate(3, seed=1).images[0, 0]  # image 0 of seed 1's stream
    assert np.abs(first.astype(float) - np.rint(expected * 255)).max() <= 1
    assert cli_main(["generators", "generate", "mednist-gan-hand", "-n", "2", "--output", str(tmp_path / "ds")]) == 0
    manifest = json.loads((tmp_path / "ds" / "_manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["provenance"]["generator"] == "mednist-gan-hand@0.4.2"
    assert "wrote 2 images" in capsys.readouterr().out


def test_mednist_cli_generate_compiled_matches_eager(tmp_path):
    """``--compile`` runs the imported MONAI bundle network through torch.compile (real)."""
    args = ["generators", "generate", "mednist-gan-hand", "-n", "5", "--seed", "2", "--output"]
    assert cli_main([*args, str(tmp_path / "eager")]) == 0
    assert cli_main([*args, str(tmp_path / "compiled"), "--compile"]) == 0
    eager = read_table(tmp_path / "eager")
    compiled = read_table(tmp_path / "compiled")
    assert compiled.column("id").to_pylist() == eager.column("id").to_pylist()
    a = np.stack([decode_image(b) for b in eager.column("image").to_pylist()]).astype(int)
    b = np.stack([decode_image(b) for b in compiled.column("image").to_pylist()]).astype(int)
    assert a.shape == (5, 1, 64, 64) and a.std() > 0
    assert np.abs(a - b).max() <= 1


# ---------------------------------------------------------------- bundle import safety


def _code_bundle(root: Path, network_def: object) -> Path:
    """A MedNIST-shaped bundle with a tiny Generator and the given ``network_def``."""
    from monai.networks.nets import Generator

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    kwargs = {"latent_shape": [8], "start_shape": [8, 4, 4], "channels": [4, 1], "strides": [2, 2]}
    torch.manual_seed(0)
    torch.save(Generator(**kwargs).state_dict(), root / "models" / "model.pt")
    metadata = json.loads((MEDNIST / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["latent"]["spatial_shape"] = [8]
    metadata["network_data_format"]["outputs"]["pred"]["spatial_shape"] = [16, 16]
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    config = {"bundle_root": ".", "network_def": network_def, "kwargs": kwargs}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, ...\n")
    return root


def test_bundle_that_needs_code_is_refused_without_opt_in(tmp_path, caplog):
    sentinel = tmp_path / "code-ran"
    expr = (
        f"$(__import__('pathlib').Path({str(sentinel)!r}).touch(), "
        "monai.networks.nets.Generator(latent_shape=[8], start_shape=[8, 4, 4], channels=[4, 1], strides=[2, 2]))[1]"
    )
    bundle = _code_bundle(tmp_path / "bundle", expr)
    with pytest.raises(GeneratorError, match="allow_code=True"):
        import_bundle(bundle)
    assert cli_main(["generators", "import-bundle", str(bundle)]) == 2
    with caplog.at_level(logging.WARNING, logger="generators.bundle_import"):
        card = import_bundle(bundle, allow_code=True, card_id="t/code-bundle")
    assert "executes the Python code" in caplog.text
    assert card.network["config"] == "configs/inference.json" and card.licence == "MIT"
    assert not sentinel.exists()  # importing never evaluates the config
    card_path = install_bundle(bundle, tmp_path / "installed", card)
    with pytest.raises(GeneratorError, match="executes code"):
        load_generator(card_path)
    assert not sentinel.exists()
    batch = load_generator(card_path, allow_code=True).generate(2, seed=0)
    assert sentinel.exists() and batch.images.shape == (2, 1, 16, 16)


def test_bundle_with_unknown_network_target_is_refused(tmp_path):
    bundle = _code_bundle(tmp_path / "b", {"_target_": "UNet", "spatial_dims": 2})
    with pytest.raises(GeneratorError, match="'UNet', not a known MONAI generator"):
        import_bundle(bundle)
    literal = _code_bundle(
        tmp_path / "ok",
        {
            "_target_": "Generator",
            "latent_shape": "@kwargs::latent_shape",
            "start_shape": [8, 4, 4],
            "channels": [4, 1],
            "strides": [2, 2],
        },
    )
    card = import_bundle(literal)  # references to literals are resolved without running code
    assert card.network["kwargs"]["latent_shape"] == [8] and card.latent_dim == 8
    assert card.network["latent_distribution"] == "uniform"  # metadata declares latents in [0, 1]


# ---------------------------------------------------------------- bundle export, run by MONAI


def test_mednist_bundle_export_runs_under_monai_bundle_runner(tmp_path):
    out = tmp_path / "exported"
    assert cli_main(["generators", "export", "mednist-gan-hand", "--format", "bundle", "--out", str(out)]) == 0
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "LICENSE", "docs/README.md"):
        assert (out / name).is_file(), name
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "linear.weight" in state
    run_isolated(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(out / "configs" / "inference.json"),
            "--bundle_root",
            str(out),
            "--num_samples",
            "3",
            "--seed",
            "5",
        ],
        tmp_path,
    )
    written = read_pngs(out / "outputs", "image")
    expected = get_generator("mednist-gan-hand").generate(3, seed=5).images[:, 0]
    assert written.shape == (3, 64, 64)
    assert np.abs(written.astype(float) - np.rint(expected * 255)).max() <= 1  # same images, upright
    # and synthmed imports its own export back to the same generator
    card = import_bundle(out)
    assert card.id == "mednist-gan-hand" and card.network["spatial_order"] == "monai"
    again = load_generator(install_bundle(out, tmp_path / "reimported", card)).generate(3, seed=5).images
    assert np.allclose(again[:, 0], expected, atol=1e-6)


def test_conditional_cgan_with_masks_bundle_export_runs_under_monai(tmp_path):
    entry = make_cgan(tmp_path / "cgan", masks=2)
    generator = load_generator(entry)
    from generators.bundle_export import export_bundle

    out = export_bundle(generator, tmp_path / "bundle", source_dir=entry.path.parent, num_samples=4)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    label = meta["network_data_format"]["inputs"]["label"]  # one-hot, concatenated after the latent
    assert label["channel_def"] == {"0": "healthy", "1": "lesion"} and label["format"] == "labels"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "mask logit of class 'bg'"
    run_isolated(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(out / "configs" / "inference.json"),
            "--bundle_root",
            str(out),
            "--seed",
            "2",
        ],
        tmp_path,
    )
    batch = generator.generate(4, seed=2)  # labels cycle healthy, lesion, ... in both
    images, masks = read_pngs(out / "outputs", "image"), read_pngs(out / "outputs", "mask")
    assert images.shape == (4, 16, 16) and masks.shape == (4, 16, 16)
    assert np.abs(images.astype(float) - np.rint(batch.images[:, 0] * 255)).max() <= 1
    assert np.array_equal(masks, batch.masks)
    card = import_bundle(out)  # the card travels in metadata.json
    reloaded = load_generator(install_bundle(out, tmp_path / "re", card))
    assert reloaded.card.architecture == "monai_bundle" and reloaded.card.conditioning.labels == ("healthy", "lesion")
    again = reloaded.generate(4, seed=2, condition=["lesion", "lesion", "healthy", "lesion"])
    ref = generator.generate(4, seed=2, condition=["lesion", "lesion", "healthy", "lesion"])
    assert np.allclose(again.images, ref.images, atol=1e-6) and np.array_equal(again.masks, ref.masks)


# ---------------------------------------------------------------- TorchScript


def test_torchscript_round_trip_without_synthmed(tmp_path):
    cgan = load_generator(make_cgan(tmp_path / "cgan", masks=2))
    hand = get_generator("mednist-gan-hand")
    cases = {}
    for name, generator in (("cgan", cgan), ("hand", hand)):
        path = export_torchscript(generator, tmp_path / name)
        card = load_card(path.parent / "card.yaml")
        assert card.architecture == "torchscript" and card.weights.sha256 == sha256_file(path)
        assert "label_index" in card.network["signature"]
        assert embedded_card(path)["id"] == generator.card.id
        from generators.latent import sample_latent

        z = sample_latent(4, card.latent_dim, card.network["latent_distribution"], seed=7)
        torch.save({"z": z, "labels": torch.tensor([1, 0, 1, 1])}, tmp_path / f"{name}-in.pt")
        cases[name] = (path, generator, card)
    script = textwrap.dedent(
        """
        import sys, torch
        assert not any(m.split('.')[0] in ('generators', 'flows', 'tasks') for m in sys.modules)
        for name in ('cgan', 'hand'):
            inputs = torch.load(f'{name}-in.pt', weights_only=True)
            net = torch.jit.load(f'{name}/model.ts')
            out = {'default': net(inputs['z'])}
            if name == 'cgan':
                out['labelled'] = net(inputs['z'], inputs['labels'])
            torch.save(out, f'{name}-out.pt')
        try:
            import generators
        except ImportError:
            print('synthmed not importable')
        """
    )
    proc = run_isolated([sys.executable, "-c", script], tmp_path)
    assert "synthmed not importable" in proc.stdout
    hand_out = torch.load(tmp_path / "hand-out.pt", weights_only=True)["default"]
    assert hand_out.shape == (4, 1, 64, 64)
    assert np.allclose(hand_out.numpy(), hand.generate(4, seed=7).images, atol=1e-5)
    cgan_out = torch.load(tmp_path / "cgan-out.pt", weights_only=True)
    assert cgan_out["default"].shape == (4, 2, 16, 16)  # image + mask index channel
    assert np.allclose(cgan_out["default"][:, :1].numpy(), cgan.generate(4, seed=7).images, atol=1e-5)
    labelled = cgan.generate(4, seed=7, condition=["lesion", "healthy", "lesion", "lesion"])
    assert np.allclose(cgan_out["labelled"][:, :1].numpy(), labelled.images, atol=1e-5)
    assert np.array_equal(cgan_out["labelled"][:, 1].long().numpy(), labelled.masks)


def test_torchscript_import_needs_opt_in_and_loads_back(tmp_path, user_registry):
    generator = get_generator("mednist-gan-hand")
    path = export_torchscript(generator, tmp_path / "ts")
    with pytest.raises(GeneratorError, match="allow_code=True"):
        import_torchscript(path)
    card = import_torchscript(path, allow_code=True, fields={"id": "t/hand-ts", "version": "2.0.0"})
    assert card.id == "t/hand-ts" and card.licence == "Apache-2.0"  # the rest comes from the embedded card
    save_card(card, tmp_path / "ts" / "card.yaml")
    assert cli_main(["generators", "add", str(tmp_path / "ts" / "card.yaml"), str(path)]) == 2  # no --allow-code
    assert not list(user_registry.glob("**/card.yaml"))
    assert cli_main(["generators", "add", str(tmp_path / "ts" / "card.yaml"), str(path), "--allow-code"]) == 0
    with pytest.raises(GeneratorError, match="allow_code=True"):
        get_generator("t/hand-ts")
    loaded = get_generator("t/hand-ts", allow_code=True)
    assert np.allclose(loaded.generate(3, seed=9).images, generator.generate(3, seed=9).images, atol=1e-5)


# ---------------------------------------------------------------- medigan


def test_medigan_import_maps_fields_and_is_unavailable(tmp_path):
    cards = {c.id: c for c in import_medigan(MEDIGAN_JSON, tmp_path / "medigan")}
    assert len(cards) == len(json.loads(MEDIGAN_JSON.read_text())) == 23
    assert all(c.architecture == "external" and not c.available for c in cards.values())
    calc = cards["medigan/00001_DCGAN_MMG_CALC_ROI"]
    assert (calc.modality, calc.anatomy, calc.image_size, calc.channels) == ("mammography", "breast", (128, 128), 1)
    assert calc.metrics["fid"].value == pytest.approx(67.6) and not calc.metrics["fid"].higher_is_better
    assert calc.metrics["fid_radimagenet"].extractor == "RadImageNet"
    assert calc.licence == "MIT" and calc.latent_dim == 100 and calc.training.dataset.startswith("INbreast")
    assert "zenodo.org" in calc.origin.url and calc.origin.kind == "medigan"
    assert "10.5281/zenodo.5187714" in calc.origin.citation
    polyps = cards["medigan/00009_PGGAN_POLYP_PATCHES_W_MASKS"]
    assert polyps.conditioning.masks and polyps.channels == 4 and polyps.modality == "endoscopy"
    assert cards["medigan/00021_CYCLEGAN_BRAIN_MRI_T1_T2"].image_size == (224, 192)
    assert "condition:age" in cards["medigan/00022_WGAN_CARDIAC_AGING"].tags
    assert "unspecified" in cards["medigan/00022_WGAN_CARDIAC_AGING"].licence
    assert (tmp_path / "medigan" / "LICENSE").read_text().startswith("MIT License")


def test_medigan_cards_are_searchable_and_rankable_next_to_ours(tmp_path):
    import_medigan(MEDIGAN_JSON, tmp_path / "reg" / "medigan")
    make_cgan(tmp_path / "reg" / "ours")
    entries = registry.list_entries([tmp_path / "reg"])
    polyp = [e.card.id for e in registry.search("polyp", entries=entries)]
    assert len(polyp) == 3 and all("POLYP" in i for i in polyp)
    ranked = registry.search("", {"modality": "mammography"}, rank_by="fid", entries=entries)
    fids = [e.card.metrics["fid"].value for e in ranked]
    index = json.loads(MEDIGAN_JSON.read_text())
    mmg = {k: v["selection"]["performance"]["FID"] for k, v in index.items() if v["selection"]["modality"][0] == "MMG"}
    assert len(ranked) == len(mmg) == 12 and fids == sorted(fids)
    assert ranked[0].card.id == f"medigan/{min(mmg, key=mmg.get)}" == "medigan/00001_DCGAN_MMG_CALC_ROI"
    available = registry.search("", {"available": "true"}, entries=entries)
    assert [e.card.id for e in available] == ["t/cgan"]
    with pytest.raises(GeneratorError, match="listed for search only"):
        load_generator(registry.find("medigan/00019_PGGAN_CHEST_XRAY", entries=entries))


def test_shipped_medigan_cards_match_a_fresh_import_and_cli(tmp_path, capsys):
    assert cli_main(["generators", "import-medigan", str(MEDIGAN_JSON), "--out", str(tmp_path / "m")]) == 0
    assert "imported 23 medigan cards" in capsys.readouterr().out
    for shipped in sorted((ZOO / "medigan").glob("*/card.yaml")):
        fresh = tmp_path / "m" / shipped.parent.name / "card.yaml"
        assert yaml.safe_load(fresh.read_text()) == yaml.safe_load(shipped.read_text()), shipped.parent.name
    assert len(list((ZOO / "medigan").glob("*/card.yaml"))) == 23
    assert cli_main(["generators", "rank", "fid", "chest", "x-ray"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0].startswith("medigan/00020_PGGAN_CHEST_XRAY")
        and "fid=52.17" in out[0]
        and "[weights unavailable]" in out[0]
    )


# ---------------------------------------------------------------- visualise


def test_visualise_grid_and_interpolation(tmp_path):
    generator = get_generator("mednist-gan-hand")
    written = visualise(generator, tmp_path / "vis", n=9, seed=2, rows=3, steps=5)
    samples = np.asarray(Image.open(written["samples"]))
    assert samples.shape == (3 * (64 + PAD) + PAD,) * 2
    interp = np.asarray(Image.open(written["interpolation"]))
    assert interp.shape == (3 * (64 + PAD) + PAD, 5 * (64 + PAD) + PAD)
    # each row starts at the seed's latent and ends at seed + 1's
    start = to_display(generator.generate(3, seed=2).images, (0, 1))
    end = to_display(generator.generate(3, seed=3).images, (0, 1))
    for r in range(3):
        y = PAD + r * (64 + PAD)
        assert np.abs(interp[y : y + 64, PAD : PAD + 64].astype(int) - start[r]).max() <= 1
        x = PAD + 4 * (64 + PAD)
        assert np.abs(interp[y : y + 64, x : x + 64].astype(int) - end[r]).max() <= 1
    middle = interp[PAD : PAD + 64, PAD + 2 * (64 + PAD) : PAD + 2 * (64 + PAD) + 64].astype(int)
    assert np.abs(middle - start[0]).mean() > 1 and np.abs(middle - end[0]).mean() > 1


def test_visualise_cli_conditional_with_masks(tmp_path, capsys):
    make_cgan(tmp_path / "user-registry" / "cgan", masks=2)
    assert (
        cli_main(
            [
                "generators",
                "visualise",
                "t/cgan",
                "--out",
                str(tmp_path / "v"),
                "-n",
                "4",
                "--steps",
                "3",
                "--rows",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "samples:" in out and "masks:" in out and "interpolation:" in out
    grid = interpolation_grid(load_generator(registry.find("t/cgan")), rows=2, steps=3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "v" / "interpolation.png")), grid)


# ---------------------------------------------------------------- other architectures


def _architecture_card(directory: Path, architecture: str) -> Path:
    """A tiny seeded dcgan (unconditional) or vae (2 labels) from generators.architectures."""
    from generators.architectures.dcgan import DcganConfig, build_generator
    from generators.architectures.vae import ConditionalVae, VaeConfig

    torch.manual_seed(0)
    if architecture == "dcgan":
        cfg, labels = DcganConfig(image_size=16, channels=1, latent_dim=8, base_channels=8), ()
        net = build_generator(cfg)
    else:
        cfg, labels = VaeConfig(image_size=16, channels=1, n_labels=2, latent_dim=8, base_channels=8), ("a", "b")
        net = ConditionalVae(cfg)
    directory.mkdir(parents=True)
    sha = save_weights(net.state_dict(), directory / "w.safetensors")
    card = ModelCard(
        id=f"t/{architecture}",
        version="1",
        architecture=architecture,
        network=cfg.__dict__,
        modality="MRI",
        anatomy="brain",
        image_size=(16, 16),
        channels=1,
        licence="MIT",
        latent_dim=8,
        conditioning={"labels": labels},
        weights=Weights(file="w.safetensors", sha256=sha),
    )
    save_card(card, directory / "card.yaml")
    return directory / "card.yaml"


@pytest.mark.parametrize(("architecture", "weights_file"), [("dcgan", "model.pt"), ("vae", "model.ts")])
def test_loader_architectures_export_to_torchscript_and_bundle(tmp_path, architecture, weights_file):
    from monai.bundle import run

    from generators.bundle_export import export_bundle
    from generators.latent import sample_latent

    generator = load_generator(_architecture_card(tmp_path / architecture, architecture))
    expected = generator.generate(3, seed=4)
    net = torch.jit.load(str(export_torchscript(generator, tmp_path / "ts")))
    labels = torch.tensor([0, 1, 0]) if generator.card.conditioning.labels else None
    z = sample_latent(3, 8, "normal", seed=4)
    out = net(z) if labels is None else net(z, labels)
    assert np.allclose(out.numpy(), expected.images, atol=1e-5)
    # a MONAI network exports as a state dict; other networks as their TorchScript latent module
    # (plus its state dict as models/model.pt, which model-zoo requires)
    bundle = export_bundle(generator, tmp_path / "bundle", num_samples=3)
    assert sorted(p.name for p in (bundle / "models").iterdir()) == sorted({"model.pt", weights_file})
    run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), seed=4, logging_file=False)
    written = read_pngs(bundle / "outputs", "image")
    assert np.abs(written.astype(float) - np.rint(expected.images[:, 0] * 255)).max() <= 1
