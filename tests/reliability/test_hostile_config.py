"""Hostile configuration and registry input: YAML bombs, out-of-range numbers, card ids
that try to write outside the registry, broken cards next to good ones, credentials in
an S3 endpoint, labels that look like paths. Each case ends in one error line (exit 2
for the CLI) or a correct result, quickly, with nothing written where it must not be."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from generators.card import load_card, save_card
from generators.errors import ConfigError, DataError
from generators.registry import list_entries, load_generator
from generators.safe_paths import safe_join
from generators.safe_yaml import MAX_YAML_BYTES
from generators.weights import save_weights
from tasks.config import _short, load_pipelines
from tests.generators.tiny_models import tiny_cgan_card
from tests.reliability.helpers import assert_one_line, cli, trained_project

VALID = "pipelines:\n  demo:\n    source: {kind: mni152}\n    generator: {train: {}}\n"
ZOO = Path(__file__).resolve().parents[2] / "generators" / "zoo"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """~500 bytes of YAML whose aliases expand to ``width ** levels`` scalars."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(autouse=True)
def user_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep ~/.synthmed out of the tests: the user registry is a fresh temp dir."""
    path = tmp_path / "user-registry"
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(path))
    return path


def tiny_card(directory: Path, *, labels: tuple[str, ...] = ("healthy", "lesion"), **fields) -> Path:
    """A tiny seeded 16x16 cGAN as card.yaml + weights.safetensors; ``fields`` are written
    into the YAML unvalidated (to plant hostile ids and versions)."""
    card = tiny_cgan_card(directory, card_id="t/tiny", labels=labels)
    data = {**card.model_dump(mode="json"), **fields}
    (directory / "card.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return directory / "card.yaml"


# --------------------------------------------------------------------------- 1. YAML bombs
def test_short_is_bounded_for_a_value_with_a_billion_leaves() -> None:
    value: object = [0] * 10
    for _ in range(9):  # shared lists: 10**10 leaves in a full repr
        value = [value] * 10
    started = time.perf_counter()
    text = _short(value)
    assert time.perf_counter() - started < 0.5 and len(text) <= 60


def test_pipelines_yaml_alias_bomb_is_refused_in_under_two_seconds(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(alias_bomb() + VALID)
    assert len(path.read_bytes()) < 700
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert time.perf_counter() - started < 2
    assert_one_line(str(info.value), "pipelines.yaml", "aliases expand to more than 100,000 nodes", "write the values")


@pytest.mark.integration
def test_cli_validate_refuses_the_alias_bomb_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "pipelines.yaml").write_text(alias_bomb() + VALID)
    proc = cli(["validate"], tmp_path, timeout_s=60)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: ", "an alias bomb?")


def test_card_alias_bomb_in_training_config_is_refused_in_under_two_seconds(tmp_path: Path) -> None:
    card_path = tiny_card(tmp_path / "bomb")
    text = card_path.read_text()
    bomb = "  config:\n" + "".join(f"    {line}\n" for line in alias_bomb().splitlines())
    card_path.write_text(text.replace("  config: {}\n", bomb))
    assert "*a7" in card_path.read_text() and len(card_path.read_bytes()) < 4096
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_card(card_path)
    assert time.perf_counter() - started < 2
    assert_one_line(str(info.value), "card.yaml", "an alias bomb?")


@pytest.mark.integration
def test_cli_search_and_show_survive_an_alias_bomb_card_in_the_user_registry(tmp_path: Path) -> None:
    registry = tmp_path / "user-registry"
    card_path = tiny_card(registry / "bomb")
    card_path.write_text(card_path.read_text() + alias_bomb())
    extra = {"SYNTHMED_REGISTRY": str(registry)}
    proc = cli(["generators", "search", "mednist"], tmp_path, extra, timeout_s=60)
    assert proc.returncode == 0, proc.stderr
    assert "mednist-gan-hand@" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "skipping broken card" in line]
    assert len(warnings) == 1 and "an alias bomb?" in warnings[0] and str(card_path) in warnings[0]
    proc = cli(["generators", "show", "mednist-gan-hand"], tmp_path, extra, timeout_s=60)
    assert proc.returncode == 0 and '"id": "mednist-gan-hand"' in proc.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("pipelines: &p\n  demo: [*p]\n", "recursive YAML"),  # new: a self-referencing alias
        ("[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),  # new: 100 KB of brackets
    ],
)
def test_recursive_and_deeply_nested_yaml_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert time.perf_counter() - started < 2
    assert_one_line(str(info.value), "pipelines.yaml", fragment)


def test_a_50_mb_pipelines_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """New case: the size is checked with stat, so a huge file costs nothing."""
    path = tmp_path / "pipelines.yaml"
    with open(path, "w") as handle:
        handle.write(VALID + "# padding\n")
        handle.truncate(50 << 20)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert time.perf_counter() - started < 1
    assert_one_line(str(info.value), "52,428,800 bytes", f"more than the {MAX_YAML_BYTES:,} allowed")


def test_a_card_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    """New case: YAML keeps the last of two keys silently; a card must not change meaning."""
    card_path = tiny_card(tmp_path / "dup")
    card_path.write_text(card_path.read_text() + "licence: GPL-3.0\n")
    with pytest.raises(ConfigError) as info:
        load_card(card_path)
    assert_one_line(str(info.value), "card.yaml", "duplicate key 'licence'")


def test_a_card_with_a_nan_metric_is_refused(tmp_path: Path) -> None:
    """New case: a NaN fid compares false both ways and would scramble ``generators rank``."""
    card_path = tiny_card(tmp_path / "nan", metrics={"fid": {"value": float("nan")}})
    assert ".nan" in card_path.read_text()
    with pytest.raises(ConfigError) as info:
        load_card(card_path)
    assert_one_line(str(info.value), "metrics.fid.value", "finite number")


# --------------------------------------------------------------------------- 2. bounds in validate
@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ("    seed: -1\n", "pipelines.demo.seed: Input should be greater than or equal to 0"),
        ("    seed: 10000000000000\n", "pipelines.demo.seed: Input should be less than or equal to 4294967295"),
        ("    seed: 1.0e+13\n", "pipelines.demo.seed: Input should be a valid integer"),
        ("    seed: true\n", "pipelines.demo.seed: Input should be a valid integer"),  # new: a boolean seed
        ("    synthesis: {seed: 4294967296}\n", "synthesis.seed: Input should be less than or equal to"),
        ("    retrain: {seeds: [0, -7]}\n", "retrain.seeds.1: Input should be greater than or equal to 0"),
        ("    retrain: {sweep_seeds: [1e13]}\n", "retrain.sweep_seeds.0: Input should be a valid integer"),
        ("    synthesis: {count_per_class: 1.0e+10}\n", "synthesis.count_per_class: Input should be a valid integer"),
        ("    synthesis: {count_per_class: 10000000000}\n", "count_per_class: Input should be less than or equal"),
        ("    synthesis: {count_per_class: 2.5}\n", "synthesis.count_per_class: Input should be a valid integer"),
        ("    synthesis: {counts: {x: -3}}\n", "synthesis.counts.x: Input should be greater than or equal to 0"),
        ("    synthesis: {counts: {x: 1e10}}\n", "synthesis.counts.x: Input should be a valid integer"),
        # new: one shard of 60,000 1024x1024 images would be 58.6 GiB in memory
        (
            "    preprocess: {size: 1024}\n    synthesis: {shard_rows: 60000}\n",
            "58.6 GiB per shard in memory; at most 2 GiB: set shard_rows <= 2048",
        ),
    ],
)
def test_out_of_range_seeds_and_counts_are_refused_by_load(tmp_path: Path, section: str, fragment: str) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(VALID + section)
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert_one_line(str(info.value), "pipelines.yaml: ", fragment)


def test_generator_train_seed_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(VALID.replace("generator: {train: {}}", "generator: {train: {seed: -5}}"))
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert_one_line(str(info.value), "generator.train.seed: Input should be greater than or equal to 0")


@pytest.mark.integration
@pytest.mark.parametrize(
    "section",
    [
        "    seed: -1\n",
        "    seed: 10000000000000\n",
        "    synthesis: {count_per_class: 1.0e+10}\n",
        "    synthesis: {counts: {x: -3}}\n",
    ],
)
def test_cli_validate_refuses_out_of_range_numbers_with_exit_2(tmp_path: Path, section: str) -> None:
    (tmp_path / "pipelines.yaml").write_text(VALID + section)
    proc = cli(["validate"], tmp_path, timeout_s=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line(proc.stderr, "error: pipelines.yaml: pipelines.demo.")


def test_the_largest_allowed_seeds_really_work(tmp_path: Path) -> None:
    """The bound is not arbitrary: train and synthesize run with seeds of 2**32 - 1."""
    from tasks.config import PipelineConfig
    from tasks.synthesize import synthesize

    cfg, paths = trained_project(tmp_path, "p", seed=2**32 - 1)
    cfg = PipelineConfig.model_validate({**cfg.model_dump(), "seed": 2**32 - 1})
    summary = synthesize(cfg, paths)
    assert summary["counts"] == {"disc": 4, "ring": 4, "square": 4} and summary["shards"] == 3
    assert len(list(paths.synthetic.glob("*.parquet"))) == 3


# --------------------------------------------------------------------------- 3. ids and versions
@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "/abs/evil"), ("id", "t/../../evil"), ("id", "t//evil"), ("version", "../../evil"), ("version", "1/2")],
)
def test_card_ids_and_versions_that_are_paths_are_refused(tmp_path: Path, field: str, value: str) -> None:
    card_path = tiny_card(tmp_path / "c", **{field: value})
    with pytest.raises(ConfigError) as info:
        load_card(card_path)
    assert_one_line(str(info.value), "card.yaml: invalid model card: ", f"{field}: {field} must be", "got ")


def test_safe_join_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    base = tmp_path / "registry"
    base.mkdir()
    assert safe_join(base, "t", "tiny", "1.0.0") == (base / "t" / "tiny" / "1.0.0").resolve()
    for part in ("/etc", "..", "a/../..", "", "a\\b"):
        with pytest.raises(ConfigError):
            safe_join(base, part)
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="leads outside"):
        safe_join(base, "link", "x")


@pytest.mark.integration
@pytest.mark.parametrize(("field", "value"), [("id", "ABS"), ("version", "../../../outside")])
def test_cli_generators_add_with_a_hostile_id_writes_nothing_outside(tmp_path: Path, field: str, value: str) -> None:
    outside = tmp_path / "outside"
    value = str(outside / "evil") if value == "ABS" else value
    card_path = tiny_card(tmp_path / "contrib", **{field: value})
    registry = tmp_path / "work" / "registry"
    (tmp_path / "work").mkdir()
    before = files_under(tmp_path)
    proc = cli(["generators", "add", str(card_path), "--registry", str(registry)], tmp_path / "work", timeout_s=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr.strip().splitlines()[-1], "error: ", f"{field}: ")
    assert not outside.exists() and files_under(tmp_path) == before


@pytest.mark.integration
def test_cli_import_bundle_with_a_hostile_id_writes_nothing(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    before = files_under(tmp_path)
    proc = cli(
        [
            "generators",
            "import-bundle",
            str(ZOO / "mednist_gan"),
            "--id",
            str(tmp_path / "evil"),
            "--registry",
            str(registry),
        ],
        tmp_path,
        timeout_s=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "error: ", "id: ", "id must be")
    assert files_under(tmp_path) == before


def medigan_entry() -> dict:
    return {"execution": {"image_size": [64, 64]}, "selection": {"modality": ["MRI"]}, "description": {}}


@pytest.mark.integration
@pytest.mark.parametrize("key", ["/ABS/evil", "..", "nested/evil"])
def test_cli_import_medigan_with_a_crafted_model_key_writes_nothing_outside(tmp_path: Path, key: str) -> None:
    key = key.replace("/ABS", str(tmp_path / "outside"))
    index = tmp_path / "global.json"
    index.write_text(json.dumps({"00001_OK": medigan_entry(), key: medigan_entry()}))
    out = tmp_path / "cards"
    before = files_under(tmp_path)
    proc = cli(["generators", "import-medigan", str(index), "--out", str(out)], tmp_path, timeout_s=60)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "error: ", "medigan entry")
    assert files_under(tmp_path) == before  # validated before anything is written


def test_ship_with_a_hostile_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """New case: ``generators ship --id /abs`` (the card is copied without validation)."""
    from generators.ship import ship_generator

    trained_project(tmp_path, "p")
    out = tmp_path / "zoo" / "shipped"
    with pytest.raises(ConfigError) as info:
        ship_generator(tmp_path, "p", str(tmp_path / "evil"), out)
    assert_one_line(str(info.value), "invalid model card: id: id must be")
    with pytest.raises(ConfigError, match="version: version must be"):
        ship_generator(tmp_path, "p", "synthmed/ok", out, version="../../x")
    assert not out.exists() and not (tmp_path / "evil").exists()


def test_a_weights_symlink_out_of_the_card_folder_is_refused(tmp_path: Path) -> None:
    """New case: ``weights.safetensors -> /etc/passwd`` (or any file outside) is neither
    read nor copied into a registry by ``generators add``."""
    from generators.conformance import register

    card_path = tiny_card(tmp_path / "contrib")
    secret = tmp_path / "secret.safetensors"
    (card_path.parent / "weights.safetensors").rename(secret)
    (card_path.parent / "weights.safetensors").symlink_to(secret)
    with pytest.raises(ConfigError) as info:
        load_generator(card_path)
    assert_one_line(str(info.value), "t/tiny@1.0.0: weights.file", "leads outside")
    registry = tmp_path / "registry"
    with pytest.raises(ConfigError):
        register(card_path, None, registry)
    assert not any(p.is_file() for p in files_under(registry))


def test_a_licence_symlink_out_of_the_card_folder_is_not_copied(tmp_path: Path) -> None:
    """New case: attribution files travel with a model; one that points elsewhere is refused."""
    from generators.conformance import register

    card_path = tiny_card(tmp_path / "contrib")
    private = tmp_path / "private.txt"
    private.write_text("not for the registry")
    (card_path.parent / "LICENSE").symlink_to(private)
    registry = tmp_path / "registry"
    with pytest.raises(ConfigError, match="LICENSE"):
        register(card_path, None, registry)
    assert not any("not for the registry" in p.read_text() for p in files_under(registry) if p.is_file())


# --------------------------------------------------------------------------- 4. one broken card
def test_a_broken_user_card_is_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = tmp_path / "user-registry"
    tiny_card(registry / "good")
    broken = registry / "broken" / "card.yaml"
    broken.parent.mkdir(parents=True)
    broken.write_text("id: broken\nversion: [1\n")
    with caplog.at_level("WARNING", logger="generators.registry"):
        entries = list_entries([registry])
        list_entries([registry])  # warned once per file and reason
    assert [e.card.ref for e in entries] == ["t/tiny@1.0.0"]
    warnings = [r.getMessage() for r in caplog.records if "skipping broken card" in r.getMessage()]
    assert len(warnings) == 1
    assert_one_line(warnings[0], str(broken), "model card is not valid YAML", "synthmed generators check")


@pytest.mark.integration
def test_cli_show_of_a_shipped_model_works_next_to_a_broken_card_and_check_reports_it(tmp_path: Path) -> None:
    registry = tmp_path / "user-registry"
    broken = registry / "broken" / "card.yaml"
    broken.parent.mkdir(parents=True)
    broken.write_text("id: /etc/broken\nversion: '1'\n")
    extra = {"SYNTHMED_REGISTRY": str(registry)}
    proc = cli(["generators", "show", "mednist-gan-hand"], tmp_path, extra, timeout_s=60)
    assert proc.returncode == 0, proc.stderr
    assert '"id": "mednist-gan-hand"' in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "skipping broken card" in line]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "id must be" in warnings[0]
    proc = cli(["generators", "check", str(broken)], tmp_path, extra, timeout_s=60)
    assert proc.returncode == 1  # the conformance report: the card check fails, the rest is not run
    card_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("FAIL card"))
    assert_one_line(card_line, "invalid model card: id: id must be", "got '/etc/broken'")


# --------------------------------------------------------------------------- 5. S3 endpoint secrets
def dvc_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env_url", "arg_url", "fragment"),
    [
        (
            "https://AKIAKEY:TOPSECRETVALUE@s3.example.org",
            None,
            "must not contain credentials (https://***@s3.example.org)",
        ),
        ("http://AKIAKEY:TOPSECRETVALUE@[::1", None, "must not contain credentials (http://***@[::1)"),
        ("ht!tp:/TOPSECRETVALUE host", None, "expected an http(s)://host[:port] URL"),
        (
            None,
            "https://AKIAKEY:TOPSECRETVALUE@minio:9000",
            "endpoint URL must not contain credentials (https://***@minio:9000)",
        ),
    ],
)
def test_cli_remote_s3_never_writes_or_prints_endpoint_credentials(
    tmp_path: Path, env_url: str | None, arg_url: str | None, fragment: str
) -> None:
    root = dvc_project(tmp_path / "project")
    config_before = (root / ".dvc" / "config").read_bytes()
    args = ["remote", "s3", "s3://bucket/prefix"] + (["--endpoint-url", arg_url] if arg_url else [])
    extra = {"SYNTHMED_S3_ENDPOINT_URL": env_url} if env_url else {"SYNTHMED_S3_ENDPOINT_URL": ""}
    proc = cli(args, root, extra, timeout_s=60)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: ", fragment)
    assert "TOPSECRETVALUE" not in proc.stdout + proc.stderr
    assert (root / ".dvc" / "config").read_bytes() == config_before


@pytest.mark.integration
def test_cli_remote_s3_refuses_credentials_in_the_bucket_uri(tmp_path: Path) -> None:
    """New case: ``s3://AKIAKEY:TOPSECRETVALUE@bucket`` would land in .dvc/config just the same."""
    root = dvc_project(tmp_path / "project")
    proc = cli(
        ["remote", "s3", "s3://AKIAKEY:TOPSECRETVALUE@bucket/x"], root, {"SYNTHMED_S3_ENDPOINT_URL": ""}, timeout_s=60
    )
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: ", "s3://***@bucket", "AWS_ACCESS_KEY_ID")
    assert "TOPSECRETVALUE" not in proc.stdout + proc.stderr + (root / ".dvc" / "config").read_text()


def test_a_pipeline_s3_uri_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    """New case: the validation message quotes its input; the secret is masked there too."""
    path = tmp_path / "pipelines.yaml"
    path.write_text(VALID.replace("{kind: mni152}", "{kind: s3, uri: 's3://AKIAKEY:TOPSECRETVALUE@bucket/images'}"))
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert_one_line(str(info.value), "source.s3.uri", "must not contain credentials")
    assert "TOPSECRETVALUE" not in str(info.value)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("http://127.0.0.1:9", "S3 endpoint unreachable"),  # nothing listens on port 9
        ("http://AKIAKEY:TOPSECRETVALUE@127.0.0.1:notaport", "must not contain credentials"),
        ("http://127.0.0.1:99999", "expected an http(s)://host[:port] URL"),
    ],
)
def test_cli_publish_to_an_unreachable_or_malformed_endpoint_is_one_line(
    tmp_path: Path, endpoint: str, fragment: str
) -> None:
    (tmp_path / "pipelines.yaml").write_text(VALID + "    storage: {results_uri: 's3://bucket/results'}\n")
    for folder in ("reports/demo", "metrics/demo"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.json").write_text("{}")
    extra = {
        "SYNTHMED_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    proc = cli(["publish", "--pipeline", "demo"], tmp_path, extra, timeout_s=120)
    assert proc.returncode == 2
    assert_one_line(proc.stderr.strip().splitlines()[-1], "error: ", fragment)
    assert "Traceback" not in proc.stderr and "TOPSECRETVALUE" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- 6. tracebacks
def test_safetensors_with_a_wrong_tensor_shape_is_a_one_line_data_error(tmp_path: Path) -> None:
    from generators.shards import sha256_file
    from tasks.synthesize import synthesize

    cfg, paths = trained_project(tmp_path, "p")
    card_path = paths.generator / "card.yaml"
    card = load_card(card_path)
    weights = paths.generator / card.weights.file
    from safetensors.torch import load_file

    state = load_file(str(weights))
    name = next(k for k, v in sorted(state.items()) if v.ndim == 4)
    expected = list(state[name].shape)
    state[name] = torch.zeros(expected[0] + 1, *expected[1:])
    save_weights(state, weights)
    save_card(
        card.model_copy(update={"weights": card.weights.model_copy(update={"sha256": sha256_file(weights)})}), card_path
    )
    with pytest.raises(DataError) as info:
        synthesize(cfg, paths)
    got = [expected[0] + 1, *expected[1:]]
    assert_one_line(str(info.value), card.ref, f"'{name}' has shape {got}", f"expects {expected}")
    assert not paths.synthetic.exists()


def test_a_label_with_a_slash_becomes_a_file_name_not_a_folder(tmp_path: Path) -> None:
    from generators.api import generate

    tiny_card(tmp_path / "user-registry" / "t1t2", labels=("T1/T2", "../up"))
    out = tmp_path / "png"
    generate("t/tiny", 4, seed=0, output=out, fmt="png")
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == ["gen-0000000_T1_T2.png", "gen-0000001__up.png", "gen-0000002_T1_T2.png", "gen-0000003__up.png"]
    assert not (tmp_path / "up").exists()
