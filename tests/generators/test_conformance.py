"""Conformance check and registration: good models pass and register; broken ones
(wrong sha256, wrong shape, out-of-range values, nondeterministic, collapsed) fail."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from flows.cli import main as cli_main
from generators import registry
from generators.api import add_generator, get_generator
from generators.card import ModelCard, Weights, load_card, save_card
from generators.conformance import ALL_CHECKS, check_conformance, register
from generators.errors import GeneratorError
from generators.shards import sha256_file
from tests.generators.test_interop import make_cgan


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
