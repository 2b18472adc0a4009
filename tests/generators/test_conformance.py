"""Conformance check and registration: good models pass and register; broken ones
(wrong sha256, wrong shape, out-of-range values, nondeterministic, collapsed) fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from flows.cli import main as cli_main
from generators import registry
from generators.api import add_generator, get_generator
from generators.card import ModelCard, Weights, load_card, save_card
from generators.conformance import ALL_CHECKS, check_conformance, init_card, placeholders, register
from generators.errors import GeneratorError
from generators.shards import sha256_file
from generators.weights import load_state_strict, save_weights, state_mismatch
from tests.generators.test_interop import make_cgan
from tests.generators.tiny_models import make_tiny


@pytest.fixture(autouse=True)
def user_registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "user-registry"
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(path))
    return path


class LatentToImage(nn.Module):
    """latent (N, D) -> sigmoid(linear) as (N, 1, size, size); each knob breaks it one way."""

    def __init__(
        self,
        latent_dim: int = 8,
        size: int = 16,
        scale: float = 1.0,
        noise: float = 0.0,
        ignore_latent: bool = False,
        batch_coupled: bool = False,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(latent_dim, size * size)
        self.size, self.scale, self.noise, self.ignore_latent = size, scale, noise, ignore_latent
        self.batch_coupled = batch_coupled

    def forward(self, latent: torch.Tensor, label_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.ignore_latent:
            latent = torch.zeros_like(latent)
        if self.batch_coupled:  # each image depends on the others: breaks the per-image seed stream
            latent = latent - latent.mean(dim=0, keepdim=True)
        x = torch.sigmoid(self.linear(latent)).reshape(-1, 1, self.size, self.size) * self.scale
        if self.noise > 0:
            x = torch.clamp(x + self.noise * torch.rand_like(x), 0.0, 1.0)  # unseeded: breaks determinism
        return x


def torchscript_model(directory: Path, module: nn.Module, *, sha256: str | None = None) -> Path:
    """Script ``module`` to ``directory/model.ts`` with a card declaring 1x16x16 in [0, 1]."""
    directory.mkdir(parents=True)
    path = directory / "model.ts"
    torch.jit.script(module).save(str(path))
    card = ModelCard(
        id=f"t/{directory.name}",
        version="1.0.0",
        architecture="torchscript",
        network={"latent_distribution": "normal"},
        modality="CT",
        anatomy="lung",
        image_size=(16, 16),
        channels=1,
        latent_dim=8,
        licence="MIT",
        weights=Weights(file="model.ts", sha256=sha256 or sha256_file(path), format="torchscript"),
    )
    save_card(card, directory / "card.yaml")
    return directory / "card.yaml"


def test_good_models_pass_every_check(tmp_path):
    cgan = make_cgan(tmp_path / "cgan", masks=2)
    report = check_conformance(cgan.path)
    assert report.passed, report.summary()
    assert [c.name for c in report.checks] == list(ALL_CHECKS)
    assert "2 of 2 labels honoured" in report.check("conditioning").detail
    ts = check_conformance(torchscript_model(tmp_path / "ts", LatentToImage()), allow_code=True)
    assert ts.passed, ts.summary()


@pytest.mark.parametrize(
    ("name", "module", "failed"),
    [
        ("out-of-range", LatentToImage(scale=3.0), "value_range"),
        ("wrong-shape", LatentToImage(size=8), "shape"),
        ("nondeterministic", LatentToImage(noise=0.05), "deterministic"),
        ("collapsed", LatentToImage(ignore_latent=True), "seed_varies"),
        ("batch-coupled", LatentToImage(batch_coupled=True), "seed_stream"),
    ],
)
def test_broken_models_fail_the_check_and_are_not_registered(tmp_path, user_registry, name, module, failed):
    card = torchscript_model(tmp_path / name, module)
    report = check_conformance(card, allow_code=True)
    assert not report.passed
    assert report.check(failed).passed is False, report.summary()
    assert report.check("load").passed and report.check("sha256").passed
    with pytest.raises(GeneratorError, match=f"conformance check failed .*{failed}"):
        register(card, allow_code=True)
    assert not user_registry.exists() or not any(user_registry.iterdir())


def test_wrong_sha256_fails_before_loading(tmp_path, user_registry):
    card = torchscript_model(tmp_path / "tampered", LatentToImage(), sha256="0" * 64)
    report = check_conformance(card, allow_code=True)
    assert report.check("sha256").passed is False and "does not match" in report.check("sha256").detail
    assert report.check("load").passed is None  # not run: nothing unverified is deserialised
    cgan = make_cgan(tmp_path / "cgan")
    with open(cgan.weights_path, "ab") as handle:
        handle.write(b"x")
    assert cli_main(["generators", "add", str(cgan.path)]) == 2
    assert not user_registry.exists() or not any(user_registry.iterdir())


def test_torchscript_without_opt_in_fails_at_load(tmp_path):
    report = check_conformance(torchscript_model(tmp_path / "ts", LatentToImage()))
    assert report.check("load").passed is False and "allow_code" in report.check("load").detail


def test_add_registers_into_user_registry_and_refuses_duplicates(tmp_path, user_registry, capsys):
    cgan = make_cgan(tmp_path / "contrib" / "cgan", card_id="t/contributed")
    weights_elsewhere = tmp_path / "downloads" / "w.safetensors"
    weights_elsewhere.parent.mkdir()
    cgan.weights_path.rename(weights_elsewhere)
    assert cli_main(["generators", "add", str(cgan.path), str(weights_elsewhere)]) == 0
    out = capsys.readouterr().out
    assert "conformance of t/contributed@1.0.0: passed" in out
    target = user_registry / "t" / "contributed" / "1.0.0"
    assert (target / "card.yaml").is_file() and (target / "weights.safetensors").is_file()
    assert load_card(target / "card.yaml") == cgan.card
    assert registry.find("t/contributed").path == target / "card.yaml"
    batch = get_generator("t/contributed").generate(2, seed=0, condition="lesion")
    assert batch.images.shape == (2, 1, 16, 16) and batch.labels == ["lesion", "lesion"]
    with pytest.raises(GeneratorError, match="already registered"):
        add_generator(cgan.path, weights_elsewhere)
    assert not list(user_registry.glob(".staging-*"))


def test_check_cli_reports_failures_with_exit_status_1(tmp_path, capsys):
    card = torchscript_model(tmp_path / "bad", LatentToImage(scale=3.0))
    assert cli_main(["generators", "check", str(card), "--allow-code"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "FAIL value_range" in out and "declared [0, 1]" in out
    good = make_cgan(tmp_path / "good")
    assert cli_main(["generators", "check", str(good.path)]) == 0


def test_mednist_bundle_imported_via_cli_passes_conformance(tmp_path, user_registry, capsys):
    from generators.registry import SHIPPED_ZOO

    bundle = SHIPPED_ZOO / "mednist_gan"
    args = ["generators", "import-bundle", str(bundle), "--id", "t/hand", "--modality", "X-ray", "--anatomy", "hand"]
    assert cli_main(args) == 0
    assert "conformance of t/hand@0.4.2: passed" in capsys.readouterr().out
    installed = user_registry / "t" / "hand" / "0.4.2"
    for name in ("card.yaml", "models/model.pt", "configs/inference.json", "LICENSE", "docs/data_license.txt"):
        assert (installed / name).is_file(), name
    card = registry.find("t/hand").card
    assert card.network["latent_distribution"] == "uniform"  # the bundle's own declared latent range
    images = get_generator("t/hand").generate(2, seed=0).images
    assert images.shape == (2, 1, 64, 64) and np.all((images >= 0) & (images <= 1))


def test_schema_cli_prints_the_card_json_schema(capsys):
    assert cli_main(["generators", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "ModelCard" and schema["additionalProperties"] is False
    assert {"id", "version", "architecture", "modality", "anatomy", "image_size", "channels", "licence"} <= set(
        schema["required"]
    )
    assert schema["$defs"]["Weights"]["properties"]["format"]["enum"] == ["safetensors", "torch", "torchscript", "zip"]


def test_card_init_fills_sha256_and_network_and_check_names_the_placeholders(tmp_path, capsys):
    tiny = make_tiny(tmp_path / "tiny", "dcgan")
    weights = tiny.parent / "weights.safetensors"
    out = tiny.parent / "new-card.yaml"
    args = ["generators", "card-init", "--weights", str(weights), "--architecture", "dcgan", "--out", str(out)]
    assert cli_main([*args, "--image-size", "16", "16", "--latent-dim", "8", "--network", "base_channels=8"]) == 0
    printed = capsys.readouterr().out
    assert "fill in: name, description, modality, anatomy, training.dataset" in printed
    card = load_card(out)
    assert card.weights.sha256 == sha256_file(weights) and card.weights.file == "weights.safetensors"
    assert card.network == {"image_size": 16, "channels": 1, "latent_dim": 8, "base_channels": 8}

    report = check_conformance(out)
    assert report.check("card").passed is False and report.check("load").passed is None
    assert "fill in the placeholders name, description, modality, anatomy" in report.check("card").detail
    assert "licence" in report.check("card").detail

    filled = yaml.safe_load(out.read_text())
    for key in ("name", "description", "modality", "anatomy", "licence"):
        filled[key] = "filled"
    filled["training"] = {"dataset": "MNI152", "dataset_licence": "see the atlas"}
    filled["origin"]["authors"] = "the test"
    out.write_text(yaml.safe_dump(filled))
    assert check_conformance(out).passed
    assert cli_main([*args, "--image-size", "16", "16"]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_card_init_marks_required_network_keys(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_weights({"x": torch.zeros(1)}, weights)
    card = init_card(weights, "ddpm", tmp_path / "card.yaml", image_size=(16, 16), labels=("a", "b"))
    assert card.network["n_labels"] == 2 and card.network["timesteps"] == 1000
    assert str(card.network["unet_channels"]).startswith("TODO")
    assert "network.unet_channels" in placeholders(card) and "network.attention_levels" in placeholders(card)


def test_a_weights_mismatch_names_missing_unexpected_keys_and_shapes():
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "extra.weight": torch.zeros(1)}
    with pytest.raises(GeneratorError) as caught:
        load_state_strict(module, state, "t/model@1")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("t/model@1: the weights do not fit the network")
    assert "2 missing key(s): 1.bias, 1.weight" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "0.weight [3, 5] in the file, [3, 4] in the network" in message
    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    assert "(+16 more)" in state_mismatch(many, {})  # 20 missing keys: four named, then a count
    assert state_mismatch(module, dict(module.state_dict())) == ""


def test_contributing_documents_every_network_key_of_every_architecture():
    from generators.conformance import NETWORK_CONFIGS, network_keys

    text = (Path(__file__).resolve().parents[2] / "CONTRIBUTING.md").read_text()
    assert "generators/cards" not in text and "generators/zoo/<name>/card.yaml" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    for architecture in NETWORK_CONFIGS:
        row = next(line for names, line in rows.items() if f"`{architecture}`" in names)
        for key, _, _ in network_keys(architecture):
            assert f"`{key}`" in row, (architecture, key)


def test_get_dataloader_loads_a_torchscript_generator_only_with_allow_code(tmp_path, user_registry):
    from generators.api import get_dataloader

    register(torchscript_model(tmp_path / "ts", LatentToImage()), allow_code=True)
    with pytest.raises(GeneratorError, match="allow_code"):
        get_dataloader("t/ts", length=4)
    images, labels = next(iter(get_dataloader("t/ts", length=4, batch_size=4, allow_code=True)))
    assert tuple(images.shape) == (4, 1, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [-1, -1, -1, -1]  # unconditional
    expected = get_generator("t/ts", allow_code=True).generate(4, 0).images
    assert np.allclose(images.numpy(), expected)
