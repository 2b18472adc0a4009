"""Model cards, sha256-checked weights, search/rank/find and loading."""

from __future__ import annotations

import pytest
import torch
import yaml

from generators import registry
from generators.architectures.cgan import CganConfig, ConditionalGenerator
from generators.card import Metric, ModelCard, Weights, load_card, save_card
from generators.errors import ConfigError, GeneratorError, IntegrityError
from generators.weights import save_weights


def _write_card(directory, card_id, *, modality, anatomy, size, fid=None, arch="cgan", weights=True, tags=()):
    cfg = CganConfig(image_size=size, channels=1, n_labels=2, latent_dim=8, base_channels=8)
    directory.mkdir(parents=True)
    sha = None
    if weights:
        sha = save_weights(ConditionalGenerator(cfg).state_dict(), directory / "weights.safetensors")
    card = ModelCard(
        id=card_id,
        version="1.0.0",
        architecture=arch,
        network=cfg.__dict__,
        modality=modality,
        anatomy=anatomy,
        image_size=(size, size),
        channels=1,
        licence="MIT",
        tags=tags,
        conditioning={"labels": ("a", "b")},
        metrics={"fid": Metric(value=fid, higher_is_better=False, extractor="test")} if fid is not None else {},
        weights=Weights(file="weights.safetensors" if weights else None, sha256=sha),
    )
    save_card(card, directory / "card.yaml")
    return card


@pytest.fixture()
def zoo(tmp_path):
    _write_card(
        tmp_path / "brain", "t/brain-mri", modality="MRI", anatomy="brain", size=16, fid=30.0, tags=("diffusion",)
    )
    _write_card(tmp_path / "brain2", "t/brain-mri-better", modality="MRI", anatomy="brain", size=16, fid=12.0)
    _write_card(tmp_path / "chest", "t/chest-xray", modality="X-ray", anatomy="chest", size=32, fid=50.0)
    _write_card(tmp_path / "mammo", "t/mammo", modality="mammography", anatomy="breast", size=16, weights=False)
    return registry.list_entries([tmp_path])


def test_search_by_text_and_filter_and_rank(zoo):
    ids = [e.card.id for e in registry.search("brain mri", entries=zoo)]
    assert set(ids) == {"t/brain-mri", "t/brain-mri-better"}
    assert [e.card.id for e in registry.search("", {"modality": "x-ray"}, entries=zoo)] == ["t/chest-xray"]
    ranked = [e.card.id for e in registry.search("", rank_by="fid", entries=zoo)]
    assert ranked[:3] == ["t/brain-mri-better", "t/brain-mri", "t/chest-xray"]  # lower FID first
    assert ranked[-1] == "t/mammo"  # no metric: last
    assert [e.card.id for e in registry.search("32x32", entries=zoo)] == ["t/chest-xray"]


def test_unknown_filter_key_and_unknown_id_are_clear(zoo):
    with pytest.raises(GeneratorError, match="unknown card field 'modalty'"):
        registry.search("", {"modalty": "MRI"}, entries=zoo)
    with pytest.raises(GeneratorError, match="did you mean 't/chest-xray@1.0.0'"):
        registry.find("t/chest-xrya@1.0.0", entries=zoo)


def test_unavailable_weights_are_listed_but_refuse_to_load(zoo):
    entry = registry.find("t/mammo", entries=zoo)
    assert not entry.card.available
    with pytest.raises(GeneratorError, match="not available"):
        registry.load_generator(entry)


def test_tampered_weights_fail_the_sha256_check(zoo):
    entry = registry.find("t/brain-mri", entries=zoo)
    assert registry.load_generator(entry).generate(2, seed=0).images.shape == (2, 1, 16, 16)
    with open(entry.weights_path, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(IntegrityError, match="does not match"):
        registry.load_generator(entry)


def test_card_validation_names_the_bad_field(tmp_path):
    path = tmp_path / "card.yaml"
    good = {
        "id": "x/y",
        "version": "1",
        "architecture": "cgan",
        "modality": "MRI",
        "anatomy": "brain",
        "image_size": [16, 16],
        "channels": 1,
        "licence": "MIT",
    }
    path.write_text(yaml.safe_dump({**good, "architecture": "cgna"}))
    with pytest.raises(ConfigError, match="did you mean 'cgan'"):
        load_card(path)
    path.write_text(yaml.safe_dump({**good, "modalty": "MRI"}))
    with pytest.raises(ConfigError, match="modalty: unknown key"):
        load_card(path)
    path.write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "licence"}))
    with pytest.raises(ConfigError, match="licence"):
        load_card(path)
    path.write_text(yaml.safe_dump({**good, "id": "../escape"}))
    with pytest.raises(ConfigError, match="id must be"):
        load_card(path)
    path.write_text(yaml.safe_dump(good))
    assert load_card(path).ref == "x/y@1"


def test_pickled_code_is_refused(tmp_path):
    from generators.shards import sha256_file
    from generators.weights import load_weights

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(GeneratorError, match="refusing to unpickle"):
        load_weights(path, sha256_file(path), "torch")


def test_load_generator_dispatches_through_architecture_loaders(zoo, monkeypatch):
    import generators.architectures as architectures

    calls = []
    real = dict(architectures.LOADERS)

    def recording(card, weights, device="cpu"):
        calls.append((card.ref, weights.name, device))
        return real["cgan"](card, weights, device)

    monkeypatch.setattr(architectures, "LOADERS", {**real, "cgan": recording})
    entry = registry.find("t/brain-mri", entries=zoo)
    assert registry.load_generator(entry).generate(1, seed=0).images.shape == (1, 1, 16, 16)
    assert calls == [("t/brain-mri@1.0.0", "weights.safetensors", "cpu")]


def test_architectures_from_loaders_are_valid_card_architectures(monkeypatch):
    import generators.architectures as architectures

    good = {
        "id": "x/y",
        "version": "1",
        "modality": "MRI",
        "anatomy": "brain",
        "image_size": [16, 16],
        "channels": 1,
        "licence": "MIT",
    }
    with pytest.raises(Exception, match="unknown architecture 'mynet'"):
        ModelCard.model_validate({**good, "architecture": "mynet"})
    monkeypatch.setattr(architectures, "LOADERS", {**architectures.LOADERS, "mynet": lambda *a: None})
    assert ModelCard.model_validate({**good, "architecture": "mynet"}).architecture == "mynet"


def test_user_registry_dirs_and_available_filter(zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHMED_REGISTRY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.user_registry_dir() == tmp_path / "home" / ".synthmed" / "generators"
    monkeypatch.setenv("SYNTHMED_REGISTRY", f"{tmp_path / 'a'}{__import__('os').pathsep}{tmp_path / 'b'}")
    assert registry.user_registry_dirs() == [tmp_path / "a", tmp_path / "b"]
    assert registry.registry_dirs()[:1] == [registry.SHIPPED_ZOO]
    assert [e.card.id for e in registry.search("", {"available": "false"}, entries=zoo)] == ["t/mammo"]
    with pytest.raises(GeneratorError, match="expected true or false"):
        registry.search("", {"available": "maybe"}, entries=zoo)


def test_weights_file_must_stay_next_to_the_card():
    for bad in ("../outside.safetensors", "/etc/passwd", "a/../../b"):
        with pytest.raises(Exception, match="relative to the card"):
            Weights(file=bad)
    assert Weights(file="models/model.pt").file == "models/model.pt"


def test_shipped_zoo_lists_the_mednist_bundle_and_medigan_index(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "empty"))
    entries = registry.list_entries()
    refs = {e.card.ref for e in entries}
    assert "mednist-gan-hand@0.4.2" in refs
    assert sum(1 for e in entries if e.card.origin.kind == "medigan") == 23
    hands = registry.search("hand x-ray", {"available": "true"}, entries=entries)
    assert hands[0].card.id == "mednist-gan-hand"
