"""Exported bundles as a MONAI model-zoo reviewer checks them: model-zoo's directory rules
(``ci/verify_bundle.py``, reimplemented below), MONAI's metadata schema (validated by MONAI's
own ``verify_metadata`` against the offline copy in ``data/``), licences carried through, and
"a config written from metadata.json alone generates the same images". Plus import-bundle's
YAML configs, ``--config-file`` and ``--id``."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flows.cli import main as cli_main
from generators.bundle_export import export_bundle
from generators.bundle_import import import_bundle
from generators.errors import ConfigError
from generators.registry import load_generator
from tests.generators.tiny_models import make_tiny

SCHEMA = Path(__file__).parent / "data" / "monai_bundle_metadata_schema.json"
MEDNIST = Path(__file__).resolve().parents[2] / "generators" / "zoo" / "mednist_gan"
#: every architecture with a bundle export: (architecture, tiny-model style)
EXPORTABLE = [
    ("cgan", "mednist"),
    ("cgan", "upsample"),
    ("dcgan", "mednist"),
    ("vae", "mednist"),
    ("ddpm", "mednist"),
    ("ddpm", "masks"),
    ("pix2pix", "mednist"),
    ("ldm", "rflow"),
]
N, SEED = 6, 3


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "user-registry"
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(path))
    return path


# ---------------------------------------------------------------- model-zoo's rules


def _find_bundle_file(root_dir: Path, file: str, suffix=("json", "yaml", "yml")) -> str | None:
    """model-zoo ci/verify_bundle.py ``_find_bundle_file``."""
    found = None
    for name in suffix:
        if f"{file}.{name}" in os.listdir(root_dir):
            found = f"{file}.{name}"
    return found


def verify_bundle_directory(bundle_path: Path) -> None:
    """model-zoo ci/verify_bundle.py ``verify_bundle_directory`` (no large-file download: a
    bundle with ``large_files.yml`` must already hold its files), ``verify_version_changes``
    without model_info.json, and CONTRIBUTING.md's docs rules (``docs/README.md``; and
    ``docs/data_license.txt`` when the data has a licence, checked by the caller)."""
    for file in ("configs/metadata.json", "LICENSE"):
        if not (bundle_path / file).exists():
            raise ValueError(f"necessary file {file} is not existing.")
    for file in ("models/model.pt", "configs/inference.json"):
        if file == "configs/inference.json":
            if _find_bundle_file(bundle_path / "configs", "inference") is None:
                raise ValueError("inference config file is not existing.")
        elif not (bundle_path / file).exists():
            raise ValueError(f"necessary file {file} is not existing.")
    metadata = json.loads((bundle_path / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in metadata:
            raise ValueError(f"'{key}' is missing in configs/metadata.json")
    if metadata["version"] not in metadata["changelog"]:
        raise ValueError(f"version number: {metadata['version']} is missing in 'changelog'")
    if not (bundle_path / "docs" / "README.md").is_file():
        raise ValueError("docs/README.md is not existing.")


def verify_metadata_format(bundle_path: Path) -> None:
    """model-zoo ``verify_metadata_format``: MONAI's ``verify_metadata`` against
    ``eval/schema.json``, put there as model-zoo's ``prepare_schema`` does (copied, not
    downloaded: the file exists, so MONAI skips the download)."""
    import hashlib

    from monai.bundle import verify_metadata

    (bundle_path / "eval").mkdir(exist_ok=True)
    shutil.copyfile(SCHEMA, bundle_path / "eval" / "schema.json")
    try:
        verify_metadata(
            meta_file=str(bundle_path / "configs" / "metadata.json"),
            filepath=str(bundle_path / "eval" / "schema.json"),
            hash_val=hashlib.md5(SCHEMA.read_bytes()).hexdigest(),
        )
    finally:
        shutil.rmtree(bundle_path / "eval")


def _export(tmp_path: Path, architecture: str, style: str):
    card = make_tiny(tmp_path / f"src-{architecture}-{style}", architecture, style=style)
    generator = load_generator(card, allow_code=True)
    return generator, export_bundle(generator, tmp_path / f"bundle-{architecture}-{style}", source_dir=card.parent)


@pytest.mark.parametrize(("architecture", "style"), EXPORTABLE)
def test_every_export_passes_model_zoo_rules_and_metadata_schema(tmp_path, architecture, style):
    _, bundle = _export(tmp_path, architecture, style)
    verify_bundle_directory(bundle)
    verify_metadata_format(bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    fmt = metadata["network_data_format"]
    for name, spec in {**fmt["inputs"], **fmt["outputs"], **fmt["post_processed_outputs"]}.items():
        assert "distribution" not in spec, name  # not a key of MONAI's tensor format
        assert spec["description"], name
    assert fmt["post_processed_outputs"]["pred"]["value_range"] == [0.0, 1.0] or fmt["post_processed_outputs"]["pred"][
        "value_range"
    ] == [0, 1]
    assert "MIT" in (bundle / "LICENSE").read_text()  # the card's licence, written as model-zoo wants
    assert "```yaml" in (bundle / "docs" / "README.md").read_text()


def test_rules_and_schema_catch_what_the_issue_found(tmp_path):
    """The checks above can fail: no LICENSE, no model.pt, an incomplete tensor format."""
    _, bundle = _export(tmp_path, "vae", "mednist")
    (bundle / "LICENSE").unlink()
    with pytest.raises(ValueError, match="necessary file LICENSE"):
        verify_bundle_directory(bundle)
    (bundle / "LICENSE").write_text("MIT")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ValueError, match="necessary file models/model.pt"):
        verify_bundle_directory(bundle)
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["network_data_format"]["inputs"]["latent"]["value_range"]
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="value_range"):
        verify_metadata_format(bundle)


def test_mednist_export_carries_model_and_data_licences(tmp_path):
    from generators.api import export

    bundle = export("mednist-gan-hand", "bundle", tmp_path / "mednist_gan")
    verify_bundle_directory(bundle)
    verify_metadata_format(bundle)
    assert (bundle / "LICENSE").read_bytes() == (MEDNIST / "LICENSE").read_bytes()
    data_licence = (bundle / "docs" / "data_license.txt").read_text()
    assert "CC BY-SA 4.0" in data_licence and "MedNIST" in data_licence
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["license"] == "Apache-2.0" and metadata["data_license"] == "CC BY-SA 4.0"
    latent = metadata["network_data_format"]["inputs"]["latent"]
    assert latent["spatial_shape"] == [64] and "N(0, 1)" in latent["description"]


def test_mask_input_export_runs_under_monai_runner_with_the_same_masks(tmp_path):
    """pix2pix takes a mask: the bundle draws image i's mask from the module's pool with the
    documented (seed, i, 1) stream, so MONAI's runner writes generate()'s images and masks."""
    from monai.bundle import run
    from PIL import Image

    generator, bundle = _export(tmp_path, "pix2pix", "mednist")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["mask"]["dtype"] == "int64"
    run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), seed=SEED, logging_file=False)
    expected = generator.generate(8, SEED)
    images = np.stack([np.asarray(Image.open(bundle / "outputs" / f"{i}_image.png")) for i in range(8)])
    masks = np.stack([np.asarray(Image.open(bundle / "outputs" / f"{i}_mask.png")) for i in range(8)])
    assert np.abs(images.astype(float) - np.rint(expected.images[:, 0] * 255)).max() <= 1
    assert np.array_equal(masks, expected.masks) and len(np.unique(expected.masks)) > 1


# ---------------------------------------------------------------- configs from metadata.json


def _parse(config: dict, bundle: Path, name: str = "images", **overrides) -> torch.Tensor:
    from monai.bundle import ConfigParser

    parser = ConfigParser(config)
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content(name)


def config_from_metadata(bundle: Path) -> dict:
    """What a model-zoo user writes by hand from ``configs/metadata.json`` alone (plus the
    architecture, ``network_def``, from ``configs/inference.json``): the latent's shape and
    distribution, the label's encoding and how it joins the latent, the output activation,
    each read from network_data_format; asserted so a wrong description fails here."""
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    network_def = json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]
    inputs, pred = metadata["network_data_format"]["inputs"], metadata["network_data_format"]["outputs"]["pred"]
    (dim,) = inputs["latent"]["spatial_shape"]
    normal = "N(0, 1)" in inputs["latent"]["description"]
    assert normal != (inputs["latent"]["value_range"] == [0, 1])
    draw = "standard_normal" if normal else "random"
    cfg = {
        "imports": ["$import numpy as np"],
        "network_def": network_def,
        "latent": "$torch.from_numpy(np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence("
        f"[@seed, i, 0]))).{draw}({dim}, dtype=np.float32) for i in range(@num_samples)]))",
    }
    if isinstance(network_def, dict):  # a MONAI network: the state dict in models/model.pt
        cfg["network"] = (
            "$[@network_def.load_state_dict(torch.load(@bundle_root + '/models/model.pt', weights_only=True)), "
            "@network_def.eval()][1]"
        )
    else:  # a TorchScript module
        cfg["network"] = "$@network_def.eval()"
    call = "@network(@latent)"
    if "label" in inputs:  # one-hot, concatenated after the latent
        n_labels = inputs["label"]["spatial_shape"][0]
        assert inputs["label"]["format"] == "labels" and len(inputs["label"]["channel_def"]) == n_labels
        assert "torch.cat([latent, label], dim=1)" in inputs["label"]["description"]
        cfg["label"] = f"$torch.nn.functional.one_hot(torch.arange(@num_samples) % {n_labels}, {n_labels}).float()"
        call = "@network(torch.cat([@latent, @label], dim=1))"
    elif "label_index" in inputs:  # an index, second argument
        n_labels = len(inputs["label_index"]["channel_def"])
        assert "network(latent, label_index)" in inputs["label_index"]["description"]
        cfg["label_index"] = f"$torch.arange(@num_samples) % {n_labels}"
        call = "@network(@latent, @label_index)"
    if "MONAI's axis order" in pred["description"]:  # (N, C, x, y): transpose to row-major
        call += ".transpose(2, 3)"
    activation = re.search(r"activation: (\w+)", pred["description"])
    if activation and pred["value_range"] == []:  # raw output: apply the documented activation
        assert activation.group(1) in ("sigmoid", "tanh")
        cfg["images"] = f"$torch.{activation.group(1)}(torch.no_grad()(lambda: {call})()[:, :1])"
    else:  # already in value_range
        cfg["images"] = f"$torch.no_grad()(lambda: {call})()[:, :1]"
    return cfg


@pytest.mark.parametrize(("architecture", "style"), [("cgan", "mednist"), ("vae", "mednist"), ("dcgan", "mednist")])
def test_config_written_from_metadata_alone_generates_the_same_images(tmp_path, architecture, style):
    generator, bundle = _export(tmp_path, architecture, style)
    expected = generator.generate(N, SEED).images
    images = _parse(config_from_metadata(bundle), bundle, seed=SEED, num_samples=N)
    assert images.shape == expected.shape
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-5)
    other = _parse(config_from_metadata(bundle), bundle, seed=SEED + 1, num_samples=N)
    assert not np.allclose(other.numpy(), expected, atol=1e-3)  # the seed matters: not a constant


def test_mednist_config_from_metadata_and_readme_match_generate(tmp_path):
    """The issue's case: the shipped MedNIST GAN (MONAI axis order, sigmoid output)."""
    from generators.api import export, get_generator

    bundle = export("mednist-gan-hand", "bundle", tmp_path / "mednist_gan")
    expected = get_generator("mednist-gan-hand").generate(N, SEED).images
    from_metadata = _parse(config_from_metadata(bundle), bundle, seed=SEED, num_samples=N).numpy()
    assert from_metadata.min() >= 0 and from_metadata.max() <= 1
    np.testing.assert_allclose(from_metadata, expected, atol=1e-5)
    (block,) = re.findall(r"```yaml\n(.*?)```", (bundle / "docs" / "README.md").read_text(), re.S)
    from_readme = _parse(yaml.safe_load(block), bundle, seed=SEED, num_samples=N).numpy()
    np.testing.assert_allclose(from_readme, expected, atol=1e-5)


@pytest.mark.parametrize(("architecture", "style"), EXPORTABLE)
def test_readme_minimal_config_generates_the_same_images(tmp_path, architecture, style):
    generator, bundle = _export(tmp_path, architecture, style)
    readme = (bundle / "docs" / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    config = yaml.safe_load(block)
    images = _parse(config, bundle, seed=SEED, num_samples=4)
    expected = generator.generate(4, SEED).images
    assert images.shape == expected.shape
    np.testing.assert_allclose(images.numpy(), expected, atol=2e-5)


# ---------------------------------------------------------------- import-bundle


def _to_yaml(bundle: Path) -> None:
    """Rewrite configs/inference.json as configs/inference.yaml (like model-zoo's mednist_reg)."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (bundle / "configs" / "inference.json").unlink()


def test_import_bundle_reads_yaml_configs_and_config_file(tmp_path, capsys):
    generator, bundle = _export(tmp_path, "cgan", "mednist")
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["synthmed_card"]  # a plain model-zoo bundle: the card comes from the config
    metadata_file.write_text(json.dumps(metadata))
    _to_yaml(bundle)
    card = import_bundle(bundle, card_id="zoo/yaml-cgan")
    assert card.network["kwargs"]["latent_shape"] == [10]  # 8 latent + 2 one-hot, read from the YAML
    assert card.latent_dim == 8 and card.conditioning.labels == ("healthy", "lesion")  # from metadata
    assert card.network["activation"] == "sigmoid" and card.network["spatial_order"] == "row_major"
    (bundle / "configs" / "inference.yaml").rename(bundle / "configs" / "infer_gan.yaml")
    with pytest.raises(ConfigError, match="--config-file"):
        import_bundle(bundle)
    with pytest.raises(ConfigError, match="inside the bundle"):
        import_bundle(bundle, config_file="../elsewhere.yaml")
    args = ["generators", "import-bundle", str(bundle), "--id", "zoo/yaml-cgan"]
    assert cli_main([*args, "--config-file", "configs/infer_gan.yaml"]) == 0
    assert "registered zoo/yaml-cgan@" in capsys.readouterr().out
    from generators.api import get_generator

    imported = get_generator("zoo/yaml-cgan").generate(N, SEED, "lesion").images
    np.testing.assert_allclose(imported, generator.generate(N, SEED, "lesion").images, atol=1e-5)


def test_import_bundle_honours_id_for_synthmed_exports(tmp_path, capsys):
    generator, bundle = _export(tmp_path, "dcgan", "mednist")
    assert import_bundle(bundle).id == "tiny/dcgan"  # the exported card's own id by default
    assert import_bundle(bundle, card_id="lab/renamed").id == "lab/renamed"
    assert cli_main(["generators", "import-bundle", str(bundle), "--id", "lab/renamed"]) == 0
    assert "registered lab/renamed@1.0.0" in capsys.readouterr().out
    from generators.api import get_generator

    assert np.array_equal(get_generator("lab/renamed").generate(3, 1).images, generator.generate(3, 1).images)
