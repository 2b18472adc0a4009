"""Untrusted artefacts: weights load only through safetensors or
``torch.load(weights_only=True)``, and only after their sha256 matched the card. A
pickle with a malicious ``__reduce__`` is refused and never runs; a wrong sha256 is
refused before a single byte is deserialised; the CLI reports both on one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

import generators.weights as weights_module
from generators.card import load_card, save_card
from generators.errors import GeneratorError, IntegrityError
from generators.registry import load_generator
from generators.shards import sha256_file
from generators.weights import load_weights, save_weights
from tests.reliability.helpers import assert_one_line, cli, trained_project, write_pipelines


class Payload:
    """Unpickling this object writes ``marker``: the side effect a weights file must never get."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a torch zip checkpoint, a legacy torch file and a bare pickle."""
    state = {"weight": torch.zeros(2), "hook": Payload(marker)}
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pt", "pickle": tmp_path / "evil.pkl"}
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(state))
    return files


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Control: the fixture is dangerous, so the refusals below mean something."""
    marker = tmp_path / "control-marker"
    pickle.loads(malicious_files(tmp_path, marker)["pickle"].read_bytes())  # noqa: S301 - on purpose
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_malicious_pickle_with_matching_sha256_is_refused_and_never_executed(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    path = malicious_files(tmp_path, marker)[kind]
    with pytest.raises(GeneratorError) as info:
        load_weights(path, sha256_file(path), fmt="torch")
    assert_one_line(str(info.value), str(path), "refusing to unpickle code")
    assert not marker.exists()


def test_wrong_or_missing_sha256_is_refused_before_any_deserialisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    path = malicious_files(tmp_path, marker)["zip"]
    calls: list[str] = []
    monkeypatch.setattr(weights_module.torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(
        weights_module, "load_safetensors_bytes", lambda *a, **k: calls.append("load_safetensors_bytes")
    )
    with pytest.raises(IntegrityError) as info:
        load_weights(path, "0" * 64, fmt="torch")
    assert_one_line(str(info.value), str(path), "does not match the card's 000000000000", "restore the original")
    with pytest.raises(IntegrityError, match="records no sha256"):
        load_weights(path, None, fmt="torch")
    with pytest.raises(IntegrityError):
        load_weights(path, "0" * 64, fmt="safetensors")
    assert calls == [] and not marker.exists()


def test_safetensors_weights_load_when_intact_and_are_refused_when_tampered(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    sha = save_weights(state, path)
    loaded = load_weights(path, sha)
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_weights(path, sha)


def test_a_card_pointing_at_a_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    """Through the registry's loader: a card (correct sha256, format torch) whose weights
    are a pickle with a payload."""
    _, paths = trained_project(tmp_path, "p")
    marker = tmp_path / "marker"
    evil = malicious_files(paths.generator, marker)["zip"]
    card = load_card(paths.generator / "card.yaml")
    bad = card.model_copy(
        update={
            "weights": card.weights.model_copy(
                update={"file": evil.name, "sha256": sha256_file(evil), "format": "torch"}
            )
        }
    )
    save_card(bad, paths.generator / "card.yaml")
    with pytest.raises(GeneratorError, match="refusing to unpickle code"):
        load_generator(paths.generator / "card.yaml")
    assert not marker.exists()


# --------------------------------------------------------------------------- CLI
@pytest.mark.integration
def test_cli_reports_a_wrong_card_sha256_on_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _, paths = trained_project(tmp_path, "p")
    card_path = paths.generator / "card.yaml"
    card = yaml.safe_load(card_path.read_text())
    card["weights"]["sha256"] = "f" * 64
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    proc = cli(["stage", "synthesize", "--pipeline", "p"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(
        proc.stderr.strip().splitlines()[-1],
        "error: ",
        "weights.safetensors: sha256",
        "does not match the card's ffffffffffff",
        "restore the original or re-register the model",
    )
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [proc.stderr.splitlines()[-1]]
    assert not paths.synthetic.exists() and not list(paths.synthetic.parent.glob(".synthetic*"))


@pytest.mark.integration
def test_cli_unknown_generator_id_and_broken_card_are_one_line_errors(tmp_path: Path) -> None:
    proc = cli(["generators", "show", "nope"], tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: no generator 'nope' in the registry; known:")

    write_pipelines(tmp_path, {"p": {"source": {"kind": "mni152"}, "generator": {"id": "nope@1.0"}}})
    proc = cli(["stage", "train", "--pipeline", "p"], tmp_path)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: no generator 'nope@1.0' in the registry")
    assert not (tmp_path / "models" / "p" / "generator").exists()

    registry = tmp_path / "registry" / "broken"
    registry.mkdir(parents=True)
    (registry / "card.yaml").write_text("id: broken\nversion: [1\n")  # YAML error: a multi-line message
    proc = cli(["generators", "show", "broken"], tmp_path, {"SYNTHMED_REGISTRY": str(registry.parent)})
    assert proc.returncode == 2
    # the broken card is skipped with one warning line naming it; the lookup then fails on one line
    warning, error = proc.stderr.strip().splitlines()
    assert_one_line(warning, "skipping broken card", "card.yaml: model card is not valid YAML", "fix the syntax")
    assert_one_line(error, "error: no generator 'broken' in the registry")
    proc = cli(["generators", "check", str(registry / "card.yaml")], tmp_path)
    assert proc.returncode == 1  # the conformance report still names the broken card
    card_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("FAIL card"))
    assert_one_line(card_line, "card.yaml: model card is not valid YAML", "fix the syntax")
