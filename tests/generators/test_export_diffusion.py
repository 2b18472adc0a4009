"""Exports reproduce ``generate(n, seed)`` with the documented seed stream: TorchScript of
every architecture (run without synthmed), MONAI bundles of the diffusion models (run by
MONAI's bundle runner), and ``import-bundle`` of a model-zoo-layout bundle whose weights
are missing or given locally."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main as cli_main
from generators.bundle_export import export_bundle
from generators.bundle_import import import_bundle, install_bundle
from generators.errors import GeneratorError
from generators.registry import load_generator
from generators.seed_stream import generate_range
from generators.torchscript import export_torchscript
from tests.generators.test_interop import run_isolated
from tests.generators.tiny_models import VARIANTS, make_tiny

N = 200
SEED = 4

# torch + numpy only: the documented stream, label cycle and mask-pool pick, nothing of synthmed
RUN_TORCHSCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch

    def rng(seed, i, stream):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, stream])))

    n, seed = int(sys.argv[1]), int(sys.argv[2])
    for path in sys.argv[3:]:
        extra = {"synthmed_card.json": ""}
        module = torch.jit.load(path, _extra_files=extra)
        card = json.loads(extra["synthmed_card.json"])
        shape = card["network"].get("latent_shape") or [card["latent_dim"]]
        latent = torch.from_numpy(np.stack([rng(seed, i, 0).standard_normal(shape, dtype=np.float32) for i in range(n)]))
        labels = card["conditioning"]["labels"]
        index = torch.arange(n) % max(len(labels), 1)
        with torch.no_grad():
            if card["network"].get("mask_input"):
                pool, pool_labels = module.mask_pool_masks.numpy(), module.mask_pool_labels.numpy()
                picks = []
                for i in range(n):
                    candidates = np.flatnonzero(pool_labels == int(index[i]))
                    picks.append(candidates[int(rng(seed, i, 1).integers(len(candidates)))])
                out = module(latent, index, torch.from_numpy(pool[picks].astype(np.int64)))
            elif labels:
                out = module(latent, index)
            else:
                out = module(latent)
        np.save(path + ".npy", out.numpy())
    """
)


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "registry"))
    return tmp_path / "registry"


def _generate(generator, n: int = N, seed: int = SEED, batch_size: int = 64):
    """What ``api.generate`` makes: batches of ``batch_size`` along the seed stream."""
    batches = [generate_range(generator, s, min(batch_size, n - s), seed) for s in range(0, n, batch_size)]
    masks = None if batches[0].masks is None else np.concatenate([b.masks for b in batches])
    return np.concatenate([b.images for b in batches]), masks


def test_torchscript_of_every_architecture_reproduces_generate(tmp_path):
    generators, paths = {}, []
    for architecture, style in VARIANTS:
        name = f"{architecture}-{style}"
        generators[name] = load_generator(make_tiny(tmp_path / name, architecture, style=style))
        paths.append(str(export_torchscript(generators[name], tmp_path / f"ts-{name}")))
    script = tmp_path / "run_ts.py"
    script.write_text(RUN_TORCHSCRIPT)
    run_isolated([sys.executable, str(script), str(N), str(SEED), *paths], tmp_path, timeout_s=600)
    for path, name in zip(paths, generators, strict=True):
        out = np.load(path + ".npy")
        images, masks = _generate(generators[name])
        channels = images.shape[1]
        assert out.shape[0] == N and out.shape[2:] == images.shape[2:], name
        grey = np.abs(np.rint(out[:, :channels] * 255) - np.rint(images * 255)).max()
        assert grey <= 1, (name, grey)  # within one grey level (exact on the CPU in practice)
        if masks is not None:
            assert np.array_equal(out[:, channels].astype(np.int64), masks), name
    # mask-input models export as bundles around their TorchScript module (masks from its pool;
    # run by MONAI's runner in tests/generators/test_bundle_conformance.py)
    for name in ("ddpm-masks", "pix2pix-mednist"):
        bundle = export_bundle(generators[name], tmp_path / f"bundle-{name}")
        assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt", "model.ts"], name
        assert "mask" in json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]


def _read_outputs(directory) -> np.ndarray:
    files = sorted(directory.glob("*_image.png"), key=lambda p: int(p.name.split("_")[0]))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_ddpm_bundle_runs_under_monai_runner_and_imports_back(tmp_path):
    generator = load_generator(make_tiny(tmp_path / "ddpm", "ddpm"))
    out = export_bundle(generator, tmp_path / "bundle", source_dir=tmp_path / "ddpm")
    for name in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "scripts/sampler.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert config["network_def"]["_target_"] == "monai.networks.nets.DiffusionModelUNet"
    assert config["noise_scheduler"]["_target_"] == "monai.networks.schedulers.DDIMScheduler"
    run_isolated(  # MONAI's own runner, in a process where synthmed cannot be imported
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(out / "configs" / "inference.json")]
        + ["--bundle_root", str(out), "--num_samples", str(N), "--seed", str(SEED), "--batch_size", "64"],
        tmp_path,
        timeout_s=600,
    )
    written = _read_outputs(out / "outputs")
    images, _ = _generate(generator)
    assert written.shape == (N, 16, 16)
    assert np.abs(written.astype(float) - np.rint(images[:, 0] * 255)).max() <= 1

    card = import_bundle(out)  # no config code runs: synthmed's ddpm loader reads the state dict
    assert card.architecture == "ddpm" and card.weights.file == "models/model.pt"
    again = load_generator(install_bundle(out, tmp_path / "installed", card)).generate(8, SEED)
    assert np.array_equal(again.images, images[:8])


def test_ldm_bundle_runs_under_monai_runner_and_imports_back(tmp_path):
    from monai.bundle import run

    generator = load_generator(make_tiny(tmp_path / "ldm", "ldm", style="rflow"))
    out = export_bundle(generator, tmp_path / "bundle")
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert config["inferer"]["_target_"] == "monai.inferers.LatentDiffusionInferer"
    assert config["noise_scheduler"]["_target_"] == "monai.networks.schedulers.RFlowScheduler"
    assert (out / "models" / "model_autoencoder.pt").is_file()
    try:  # the runner's own function, as `python -m monai.bundle run` calls it; images 150..199
        run(
            config_file=str(out / "configs" / "inference.json"),
            bundle_root=str(out),
            seed=SEED,
            num_samples=50,
            first_index=150,
            logging_file=False,
        )
    finally:  # the bundle's `scripts` package is on sys.path and cached now: forget both
        sys.path[:] = [p for p in sys.path if p != str(out)]
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    written = _read_outputs(out / "outputs")
    images, _ = _generate(generator)
    assert written.shape == (50, 16, 16)
    assert np.abs(written.astype(float) - np.rint(images[150:, 0] * 255)).max() <= 1

    card = import_bundle(out)
    installed = load_generator(install_bundle(out, tmp_path / "installed", card))
    assert installed.card.weights.file == "weights.safetensors"  # UNet + autoencoder in one file
    assert np.array_equal(installed.generate(4, SEED).images, images[:4])


def test_import_bundle_names_large_files_when_weights_are_missing(tmp_path, capsys):
    generator = load_generator(make_tiny(tmp_path / "ddpm", "ddpm"))
    out = export_bundle(generator, tmp_path / "zoo" / "tiny_ddpm")
    weights = tmp_path / "downloaded.pt"
    shutil.move(out / "models" / "model.pt", weights)
    url = "https://example.org/model_zoo/tiny_ddpm_v1.pt"
    (out / "large_files.yml").write_text(
        yaml.safe_dump(
            {"large_files": [{"path": "models/model.pt", "url": url, "hash_val": "abc123", "hash_type": "md5"}]}
        )
    )
    with pytest.raises(GeneratorError) as caught:
        import_bundle(out)
    message = str(caught.value)
    assert "\n" not in message
    assert "large_files.yml" in message and url in message and str(out / "models" / "model.pt") in message
    # the CLI says the same, in one line, and registers nothing
    assert cli_main(["generators", "import-bundle", str(out)]) != 0
    assert url in capsys.readouterr().err

    (out / "large_files.yml").unlink()
    with pytest.raises(GeneratorError, match="no large_files.yml naming a download; put its weights file at"):
        import_bundle(out)

    shutil.copy2(weights, out / "models" / "model.pt")  # the weights, given locally
    assert cli_main(["generators", "import-bundle", str(out)]) == 0
    assert "registered tiny/ddpm@1.0.0" in capsys.readouterr().out
    from generators.api import get_generator

    assert np.array_equal(get_generator("tiny/ddpm").generate(3, 1).images, generator.generate(3, 1).images)


def test_visualise_walks_diffusion_noise_and_skips_mask_input_models(tmp_path):
    from generators.visualise import visualise

    ddpm = load_generator(make_tiny(tmp_path / "ddpm", "ddpm"))
    written = visualise(ddpm, tmp_path / "v-ddpm", n=4, rows=2, steps=3)
    grid = np.asarray(Image.open(written["interpolation"]))
    assert grid.ndim == 2 and grid.std() > 0  # a (2 x 3) walk between two seeds' initial noise
    pix2pix = load_generator(make_tiny(tmp_path / "pix2pix", "pix2pix"))
    assert sorted(visualise(pix2pix, tmp_path / "v-p2p", n=4)) == ["masks", "samples"]
