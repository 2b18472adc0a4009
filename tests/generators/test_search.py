"""medigan-grade search: all-of / any-of / exact / case, selection keys and values, dotted
config lookup, short ids, --json and --order, find_and_generate, idempotent import-medigan
and medigan fields kept on the cards.

Expected medigan result sets below were computed by running medigan 1.0.0's own
``ModelSelector`` offline on the shipped ``generators/zoo/medigan/global.json``:

    python3 -m venv /tmp/mg && /tmp/mg/bin/pip install --no-deps medigan==1.0.0
    /tmp/mg/bin/pip install numpy requests tqdm          # what config_manager/utils import
    mkdir -p /tmp/mgrun/config && cp generators/zoo/medigan/global.json /tmp/mgrun/config/
    cd /tmp/mgrun && /tmp/mg/bin/python - <<'EOF'
    import importlib.util, sys, types
    from pathlib import Path
    pkg = types.ModuleType("medigan")   # skip medigan/__init__ (imports torch, PyGithub)
    pkg.__path__ = [str(Path(importlib.util.find_spec("medigan").origin).parent)]
    sys.modules["medigan"] = pkg
    from medigan.config_manager import ConfigManager   # reads ./config/global.json, no download
    from medigan.select_model.model_selector import ModelSelector
    sel = ModelSelector(config_manager=ConfigManager())
    print(sorted(m.model_id for m in sel.find_matching_models_by_values(
        values=["Mammography", "128x128", "DCGAN"], target_values_operator="AND",
        are_keys_also_matched=False, is_case_sensitive=False)))
    print([r["model_id"] for r in sel.find_models_and_rank(values=["Mammography"], metric="FID", order="asc")])
    EOF

(one call per query and option set in the tables below). The hard-coded sets are also
checked against the raw ``global.json`` by an independent whole-value matcher written
here (:func:`_medigan_match`), so a wrong expectation fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli_main
from generators import api, registry
from generators.card import ModelCard, load_card, save_card
from generators.errors import GeneratorError
from generators.medigan import import_medigan
from generators.search import selection, selection_keys, selection_values
from generators.seed_stream import generate_range
from tests.generators.tiny_models import tiny_cgan_card

ZOO = Path(registry.__file__).parent / "zoo"
MEDIGAN_JSON = ZOO / "medigan" / "global.json"
INDEX = json.loads(MEDIGAN_JSON.read_text())

# medigan 1.0.0, find_matching_models_by_values (see the module docstring for how)
README_QUERIES = [
    # README.md "Search Example" (default options)
    (["DCGAN", "Mammography", "BCDR"], False, ["00005_DCGAN_MMG_MASS_ROI"]),
    # docs description.rst: search terms "Mammography, 128x128, DCGAN" (the query)
    (
        ["Mammography", "128x128", "DCGAN"],
        False,
        ["00001_DCGAN_MMG_CALC_ROI", "00002_DCGAN_MMG_MASS_ROI", "00005_DCGAN_MMG_MASS_ROI"],
    ),
    # docs code_examples.rst, with are_keys_also_matched=True
    (["dcgan", "Mammography", "inbreast"], True, ["00001_DCGAN_MMG_CALC_ROI"]),
    # docs code_examples.rst find_model_and_generate example: 'modalities' is no key -> none
    (["dcgan", "mMg", "ClF", "modalities", "inbreast"], True, []),
]
MEDIGAN_OR = [  # ["Mammography", "128x128", "DCGAN"], target_values_operator="OR"
    *(f"{n:05d}" for n in (1, 2, 3, 4, 5, 6, 8, 12, 13, 14, 15, 16, 17)),
]
MEDIGAN_FID_ASC = [  # find_models_and_rank(values=["Mammography"], metric="FID", order="asc")
    "00001_DCGAN_MMG_CALC_ROI",
    "00014_CYCLEGAN_MMG_DENSITY_OPTIMAM_CC",
    "00002_DCGAN_MMG_MASS_ROI",
    "00016_CYCLEGAN_MMG_DENSITY_CSAW_CC",
    "00013_CYCLEGAN_MMG_DENSITY_OPTIMAM_MLO",
    "00008_C-DCGAN_MMG_MASSES",
    "00003_CYCLEGAN_MMG_DENSITY_FULL",
    "00004_PIX2PIX_MMG_MASSES_W_MASKS",
    "00015_CYCLEGAN_MMG_DENSITY_CSAW_MLO",
    "00005_DCGAN_MMG_MASS_ROI",
    "00012_C-DCGAN_MMG_MASSES",
    "00006_WGANGP_MMG_MASS_ROI",
]


def _medigan_match(selection_dict: dict, terms: list[str], keys: bool) -> bool:
    """Independent check: every term equals (case-insensitively) some value of the selection
    (list items, nested mappings) or, with ``keys``, some key."""
    found: set[str] = set()

    def walk(node: dict) -> None:
        for key, value in node.items():
            if keys:
                found.add(str(key).lower())
            if isinstance(value, dict):
                walk(value)
            else:
                found.update(str(v).lower() for v in (value if isinstance(value, list) else [value]))

    walk(selection_dict)
    return all(term.lower() in found for term in terms)


@pytest.fixture(autouse=True)
def _no_user_registry(tmp_path, monkeypatch):
    """Only the shipped zoo (and what a test adds), whatever lies in ~/.synthmed."""
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "empty-registry"))


@pytest.fixture(scope="module")
def shipped() -> list[registry.Entry]:
    return registry.list_entries([ZOO / "medigan"])


def _ids(entries) -> list[str]:
    return sorted(e.card.id.removeprefix("medigan/") for e in entries)


# ------------------------------------------------------------------ medigan's semantics


@pytest.mark.parametrize(("terms", "keys", "expected"), README_QUERIES)
def test_medigan_example_queries_give_medigan_1_0_0_sets_in_all_of_mode(shipped, tmp_path, terms, keys, expected):
    truth = sorted(k for k, v in INDEX.items() if _medigan_match(v["selection"], terms, keys))
    assert truth == expected  # the hard-coded medigan result agrees with the raw global.json
    assert _ids(registry.search(terms, entries=shipped, match="all", exact=True, match_keys=keys)) == expected
    import_medigan(MEDIGAN_JSON, tmp_path)
    fresh = registry.list_entries([tmp_path])
    assert _ids(registry.search(terms, entries=fresh, match_keys=keys)) == expected  # the default is all-of, exact
    assert _ids(api.search(terms, match_keys=keys, **{"origin.kind": "medigan"})) == expected


def test_any_of_is_medigan_or_and_the_old_behaviour_stays_reachable(shipped):
    terms = ["Mammography", "128x128", "DCGAN"]
    any_of = _ids(registry.search(terms, entries=shipped, match="any"))
    assert [i[:5] for i in any_of] == MEDIGAN_OR
    assert any_of == sorted(
        k for k, v in INDEX.items() if any(_medigan_match(v["selection"], [t], False) for t in terms)
    )
    # the earlier default (any word, substring) gave 14 (the number): reachable, and a superset
    old = _ids(registry.search("Mammography 128x128 DCGAN", entries=shipped, match="any", exact=False))
    assert len(old) == 14 and set(any_of) < set(old)
    ranked = registry.search(terms, entries=shipped, match="any")
    hits = [sum(_medigan_match(INDEX[e.card.id[8:]]["selection"], [t], False) for t in terms) for e in ranked]
    assert hits == sorted(hits, reverse=True) and hits[0] == 3  # most terms matched first


def test_exact_mode_does_not_substring_match(shipped):
    exact = _ids(registry.search("x-ray", entries=shipped))
    substring = _ids(registry.search("x-ray", entries=shipped, exact=False))
    assert len(exact) == 4 and len(substring) == 16  # the "16 vs 4"
    assert all("XRAY" in i for i in exact)
    assert "00001_DCGAN_MMG_CALC_ROI" in substring  # its modality list holds "x-ray mammography"
    assert "x-ray mammography" in INDEX["00001_DCGAN_MMG_CALC_ROI"]["selection"]["modality"]
    assert "x-ray" not in [m.lower() for m in INDEX["00001_DCGAN_MMG_CALC_ROI"]["selection"]["modality"]]
    # a partial word only matches in substring mode
    assert registry.search("mammo", entries=shipped) == []
    assert len(registry.search("mammo", entries=shipped, exact=False)) >= 12


def test_case_sensitivity_option(shipped):
    lower = ["mammography", "128x128", "dcgan"]
    assert _ids(registry.search(lower, entries=shipped)) == README_QUERIES[1][2]
    assert registry.search(lower, entries=shipped, case_sensitive=True) == []  # medigan 1.0.0: [] too
    assert _ids(registry.search(README_QUERIES[1][0], entries=shipped, case_sensitive=True)) == README_QUERIES[1][2]


def test_rank_order_asc_desc_is_medigan_order(shipped):
    asc = registry.search(["Mammography"], rank_by="FID", entries=shipped, order="asc")
    assert _ids(asc[:12]) == sorted(MEDIGAN_FID_ASC) and [e.card.id[8:] for e in asc] == MEDIGAN_FID_ASC
    desc = registry.search(["Mammography"], rank_by="fid", entries=shipped, order="desc")
    assert [e.card.id[8:] for e in desc] == MEDIGAN_FID_ASC[::-1]
    fids = [INDEX[e.card.id[8:]]["selection"]["performance"]["FID"] for e in desc]
    assert fids == sorted(fids, reverse=True)
    # default order: best first by the metric's direction (FID: lower is better; ratios: higher)
    assert registry.search(["Mammography"], rank_by="fid", entries=shipped) == asc
    best_ratio = registry.search(["Mammography"], rank_by="fid_radimagenet_ratio", entries=shipped)[0]
    assert best_ratio.card.id == "medigan/00005_DCGAN_MMG_MASS_ROI"  # medigan 1.0.0, order="desc": the same
    with pytest.raises(GeneratorError, match="unknown order 'up'"):
        registry.search("x", rank_by="fid", entries=shipped, order="up")
    with pytest.raises(GeneratorError, match="unknown match mode 'some'"):
        registry.search("x", entries=shipped, match="some")


def test_filters_reach_selection_keys(shipped):
    inbreast = _ids(registry.search("", {"dataset": "INbreast"}, entries=shipped))
    assert inbreast == sorted(k for k, v in INDEX.items() if "INbreast" in v["selection"]["dataset"])
    assert inbreast and len(inbreast) < 23
    with pytest.raises(GeneratorError, match="unknown card field 'organz'.*selection key"):
        registry.search("", {"organz": "breast"}, entries=shipped)


# ------------------------------------------------------------------ keys, dotted lookup, short ids


def test_keys_and_values_with_counts(shipped, capsys):
    cards = [e.card for e in shipped]
    keys = selection_keys(cards)
    assert set(keys) == {k for v in INDEX.values() for k in v["selection"]}
    assert keys["augmentations"] == 23
    counts = selection_values("modality", cards)
    expected_mmg = sum(1 for v in INDEX.values() if "MMG" in v["selection"]["modality"])
    assert counts["MMG"] == expected_mmg == 12
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    with_fid_key = sum(1 for v in INDEX.values() if "FID" in (v["selection"]["performance"] or {}))
    assert selection_values("performance", cards)["FID"] == with_fid_key >= 20  # a mapping's values are its keys
    with pytest.raises(GeneratorError, match="did you mean 'modality'"):
        selection_values("modalty", cards)
    # the CLI over the whole registry (shipped cards + synthmed's own: derived selections)
    assert cli_main(["generators", "keys", "type", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    dcgans = sum(1 for v in INDEX.values() if v["selection"]["type"] == "DCGAN")
    assert out["key"] == "type" and out["values"]["DCGAN"] == dcgans >= 3 and out["values"]["cgan"] >= 1
    assert cli_main(["generators", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "CARDS"] and any(line.split()[0] == "organ" for line in lines[1:])


def test_dotted_config_lookup_cli_and_api(capsys):
    assert cli_main(["generators", "show", "1", "--key", "selection.performance.FID"]) == 0
    assert capsys.readouterr().out.strip() == str(INDEX["00001_DCGAN_MMG_CALC_ROI"]["selection"]["performance"]["FID"])
    assert cli_main(["generators", "show", "00001", "--key", "description.trained_date"]) == 0
    assert capsys.readouterr().out.strip() == INDEX["00001_DCGAN_MMG_CALC_ROI"]["description"]["trained_date"]
    assert api.get_config("1", "metrics.fid.value") == pytest.approx(67.6)
    assert api.get_config("mednist-gan-hand", "conditioning.labels") == []
    assert api.get_config("1", "execution.generate_method.args.custom") == {"image_size": 128}
    assert cli_main(["generators", "show", "1", "--key", "selection.performanc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'performance'" in err and "under 'selection'" in err


def test_short_ids_and_medigan_ids(tmp_path, capsys):
    for ref in ("1", "00001", "00001_DCGAN_MMG_CALC_ROI", "medigan/00001_DCGAN_MMG_CALC_ROI", "1@0.0.1"):
        assert api.show(ref).id == "medigan/00001_DCGAN_MMG_CALC_ROI", ref
    assert api.show("20").id == "medigan/00020_PGGAN_CHEST_XRAY"
    assert cli_main(["generators", "show", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "medigan/00001_DCGAN_MMG_CALC_ROI"
    # two cards with the same medigan number: a one-line error listing both
    for name in ("a", "b"):
        _card(tmp_path / name, f"{name}/00001_X", weights=False)
    entries = registry.list_entries([tmp_path])
    for ref in ("1", "00001_X"):
        with pytest.raises(GeneratorError, match=r"'.*' is ambiguous: it names a/00001_X, b/00001_X; give the full id"):
            registry.find(ref, entries)
    assert registry.find("a/00001_X", entries).card.id == "a/00001_X"
    with pytest.raises(GeneratorError, match="no generator '99'"):
        registry.find("99", entries)


# ------------------------------------------------------------------ --json


def test_json_output_of_list_search_rank(capsys):
    assert cli_main(["generators", "search", "Mammography", "128x128", "DCGAN", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["id"].removeprefix("medigan/") for r in rows) == README_QUERIES[1][2]
    assert all(r["available"] is False and r["origin"] == "medigan" for r in rows)
    assert cli_main(["generators", "rank", "fid", "mammography", "--json", "--order", "desc"]) == 0
    rows = json.loads(capsys.readouterr().out)
    values = [r["rank_by"]["value"] for r in rows]
    assert len(rows) == 12 and values == sorted(values, reverse=True) and rows[0]["rank_by"]["metric"] == "fid"
    assert cli_main(["generators", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len({r["ref"] for r in listed}) == len(listed) >= 28
    assert cli_main(["generators", "search", "mammo", "--order", "asc"]) == 2  # --order needs a metric
    assert "--rank-by" in capsys.readouterr().err


# ------------------------------------------------------------------ find_and_generate


def _card(directory: Path, card_id: str, *, weights: bool = True, tags: tuple[str, ...] = ()) -> ModelCard:
    return tiny_cgan_card(directory, card_id=card_id, labels=("a", "b"), weights=weights, tags=tags)


def test_find_and_generate(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "reg"))
    _card(tmp_path / "reg" / "one", "t/one", tags=("searchtest", "onlyme"))
    _card(tmp_path / "reg" / "two", "t/two", tags=("searchtest",))
    batch = api.find_and_generate("searchtest onlyme", 3, seed=5)
    reference = generate_range(api.get_generator("t/one"), 0, 3, 5)
    assert batch.images.shape == (3, 1, 16, 16) and batch.images.dtype.name == "float32"
    assert (batch.images == reference.images).all() and batch.labels == ["a", "b", "a"]
    out = api.find_and_generate(["searchtest", "onlyme"], 4, output=tmp_path / "png", fmt="png")
    assert len(list(out.glob("*.png"))) == 4
    with pytest.raises(GeneratorError, match=r"2 generators match \['searchtest'\] equally: t/one@1.0.0, t/two@1.0.0"):
        api.find_and_generate("searchtest", 2)
    with pytest.raises(
        GeneratorError, match="best match medigan/00005_DCGAN_MMG_MASS_ROI@0.0.1 has no runnable weights"
    ):
        api.find_and_generate(["DCGAN", "Mammography", "BCDR"], 2)
    with pytest.raises(GeneratorError, match="best match medigan/00001_DCGAN_MMG_CALC_ROI@0.0.1 has no runnable"):
        api.find_and_generate("mammography", 2, rank_by="fid")
    with pytest.raises(GeneratorError, match="no generator matches"):
        api.find_and_generate("nosuchterm", 2)
    # two versions of one id: the latest is the match, not an ambiguity
    _card(tmp_path / "reg" / "v1", "t/versioned", weights=False, tags=("versiontest",))
    newer = _card(tmp_path / "reg" / "v2", "t/versioned", tags=("versiontest",)).model_copy(update={"version": "1.1.0"})
    save_card(newer, tmp_path / "reg" / "v2" / "card.yaml")
    assert api.find_and_generate("versiontest", 2).images.shape == (2, 1, 16, 16)


# ------------------------------------------------------------------ import-medigan


def test_import_medigan_with_the_default_output_does_not_duplicate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHMED_REGISTRY", str(tmp_path / "reg"))
    for attempt in range(2):
        assert cli_main(["generators", "import-medigan", str(MEDIGAN_JSON)]) == 0
        out = capsys.readouterr().out
        assert "imported 23 medigan cards" in out and "0 new, 0 updated, 23 identical" in out, out
        assert len(list((tmp_path / "reg" / "medigan").glob("*/card.yaml"))) == 23  # written, not skipped
        entries = registry.list_entries()
        medigan = [e for e in entries if e.card.origin.kind == "medigan"]
        assert len(medigan) == len({e.card.ref for e in medigan}) == 23, attempt
        assert all(tmp_path / "reg" in e.path.parents for e in medigan)  # the later registry wins
        assert cli_main(["generators", "rank", "fid", "mammography"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 12


def test_list_entries_keeps_one_card_per_ref_the_later_directory_winning(tmp_path):
    first = _card(tmp_path / "a" / "x", "t/x", weights=False, tags=("old",))
    _card(tmp_path / "b" / "x", "t/x", weights=False, tags=("new",))
    entries = registry.list_entries([tmp_path / "a", tmp_path / "b"])
    assert [e.card.tags for e in entries] == [("new",)] and first.tags == ("old",)
    assert [e.card.tags for e in registry.list_entries([tmp_path / "b", tmp_path / "a"])] == [("old",)]


def test_imported_cards_keep_every_medigan_field(tmp_path):
    import_medigan(MEDIGAN_JSON, tmp_path)
    for model_id, entry in INDEX.items():
        fresh = load_card(tmp_path / model_id / "card.yaml")
        shipped = load_card(ZOO / "medigan" / model_id / "card.yaml")
        assert fresh.medigan == shipped.medigan == entry, model_id
        assert selection(fresh) == entry["selection"]
    card = load_card(tmp_path / "00001_DCGAN_MMG_CALC_ROI" / "card.yaml")
    assert card.medigan["selection"]["augmentations"] == ["crop and resize", "horizontal flip", "vertical flip"]
    for key in ("vendors", "centres", "privacy_preservation"):
        assert key in card.medigan["selection"]
    assert card.medigan["description"]["trained_date"] == "May 2021"
    raw = yaml.safe_load((tmp_path / "00001_DCGAN_MMG_CALC_ROI" / "card.yaml").read_text())["medigan"]
    assert raw == INDEX["00001_DCGAN_MMG_CALC_ROI"]
    with_vendors = [k for k, v in INDEX.items() if v["selection"].get("vendors")]
    for model_id in with_vendors:
        vendors = load_card(tmp_path / model_id / "card.yaml").medigan["selection"]["vendors"]
        assert vendors == INDEX[model_id]["selection"]["vendors"]


def test_ranking_by_a_metric_no_card_reports_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in ``rank_by`` (CLI, api, a pipeline's generator query) names close metrics
    instead of listing every card with "n/a"."""
    assert cli_main(["generators", "rank", "two_sample_aoc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no card reports metric 'two_sample_aoc'; did you mean two_sample_auc")
    assert len(err.splitlines()) == 1
    assert [e.card.id for e in api.rank("two_sample_auc", "mni152")][0] == "synthmed/mni152-ldm"


def test_output_piped_into_head_ends_quietly() -> None:
    import subprocess
    import sys

    script = "import sys; from flows.cli import main; sys.exit(main(['generators', 'list', '--json']))"
    reader = "import sys; sys.stdin.readline()"  # reads one line, then leaves
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    consumer = subprocess.run([sys.executable, "-c", reader], stdin=producer.stdout, timeout=120)
    producer.stdout.close()
    _, err = producer.communicate(timeout=120)
    assert consumer.returncode == 0 and producer.returncode == 0, err.decode()
    assert b"BrokenPipeError" not in err and b"error:" not in err
