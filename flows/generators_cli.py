"""``synthmed generators ...``: the generator zoo from the command line.

list | search | rank | show | keys     find a generator (medigan-style search: all/any, exact, --json)
generate | visualise                   use one
check | add                            contribute one (conformance check, then register)
schema | card-init                     the card's JSON schema; a starting card for trained weights
export                                 MONAI bundle or TorchScript
import-bundle | import-medigan         bring in MONAI bundles and medigan's index
import-medigan-model                   run a downloaded medigan model package (subprocess, --allow-code)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from generators.errors import ConfigError


def _filters(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"filter '{item}' is not KEY=VALUE; e.g. modality=MRI")
        out[key] = value
    return out


def _print_entries(entries: list, metric: str | None = None, as_json: bool = False) -> None:
    from generators.search import metric_of, summary

    if as_json:
        print(json.dumps([summary(entry, metric) for entry in entries], indent=2))
        return
    if not entries:
        print("no generators match")
    for entry in entries:
        card = entry.card
        h, w = card.image_size
        status = "" if card.available else "  [weights unavailable]"
        if metric:
            chosen = metric_of(card, metric)
            metrics = f"{metric}={chosen.value:g}" if chosen else f"{metric}=n/a"
        else:
            metrics = ", ".join(f"{k}={m.value:g}" for k, m in sorted(card.metrics.items())[:3])
        print(
            f"{card.ref:48s} {card.architecture:13s} {card.modality:12s} {card.anatomy:10s} {h}x{w}  {metrics}{status}"
        )


def cmd_list(args: argparse.Namespace) -> int:
    from generators.registry import list_entries

    entries = list_entries()
    if args.available:
        entries = [e for e in entries if e.card.available]
    _print_entries(entries, as_json=args.json)
    return 0


def _search_args(args: argparse.Namespace, rank_by: str | None) -> list:
    from generators.registry import search

    if args.order and not rank_by:
        raise ConfigError("--order sorts by a metric; give --rank-by METRIC too (or use 'synthmed generators rank')")
    found = search(
        args.query,  # one term per argument: quote a value with spaces ("noise to image")
        _filters(args.filter),
        rank_by,
        match=args.match,
        exact=not args.substring,
        case_sensitive=args.case_sensitive,
        match_keys=args.keys,
        order=args.order,
    )
    if not found and not args.json and not args.substring:
        print(
            "no generators match (terms match whole values; try --substring for parts of values, --match any, "
            "or 'synthmed generators keys KEY' for the values)",
            file=sys.stderr,
        )
    return found


def cmd_search(args: argparse.Namespace) -> int:
    _print_entries(_search_args(args, args.rank_by), args.rank_by, args.json)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    _print_entries(_search_args(args, args.metric), args.metric, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from generators.registry import find
    from generators.search import config_value

    entry = find(args.ref)
    if args.key:
        value = config_value(entry.card, args.key)
        print(json.dumps(value, indent=2) if args.json or isinstance(value, (dict, list)) else value)
        return 0
    print(json.dumps(entry.card.model_dump(mode="json"), indent=2))
    if not args.json:
        print(f"# card: {entry.path}; weights {'available' if entry.card.available else 'unavailable'}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from generators.registry import list_entries
    from generators.search import selection_keys, selection_values

    cards = [entry.card for entry in list_entries()]
    counts = selection_values(args.key, cards) if args.key else selection_keys(cards)
    if args.json:
        print(json.dumps({"key": args.key, "values": counts} if args.key else {"keys": counts}, indent=2))
        return 0
    print(f"{'VALUE' if args.key else 'KEY':40s} CARDS")
    for name, count in counts.items():
        print(f"{name:40s} {count}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from generators.api import generate

    out = generate(
        args.ref,
        args.n,
        seed=args.seed,
        condition=args.condition,
        output=Path(args.output),
        fmt=args.format,
        device=args.device,
        allow_code=args.allow_code,
        compile=args.compile,
    )
    print(f"wrote {args.n} images to {out}")
    return 0


def cmd_visualise(args: argparse.Namespace) -> int:
    from generators.api import get_generator
    from generators.visualise import visualise

    generator = get_generator(args.ref, args.device, allow_code=args.allow_code)
    written = visualise(generator, Path(args.out), n=args.n, seed=args.seed, rows=args.rows, steps=args.steps)
    for name, path in written.items():
        print(f"{name}: {path}")
    if "interpolation" not in written:
        print(f"interpolation: not available for architecture '{generator.card.architecture}' (no latent module)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from generators.conformance import check_conformance

    report = check_conformance(args.card, args.weights, n=args.n, allow_code=args.allow_code)
    print(report.summary())
    return 0 if report.passed else 1


def cmd_add(args: argparse.Namespace) -> int:
    from generators.conformance import register

    entry, report = register(args.card, args.weights, args.registry, n=args.n, allow_code=args.allow_code)
    print(report.summary())
    print(f"registered {entry.card.ref} at {entry.path.parent}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from generators.card import ModelCard

    print(json.dumps(ModelCard.model_json_schema(), indent=2))
    return 0


def cmd_card_init(args: argparse.Namespace) -> int:
    from generators.conformance import init_card, placeholders

    network = {}
    for item in args.network:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--network '{item}' is not KEY=VALUE; e.g. --network base_channels=32")
        try:
            network[key] = json.loads(value)
        except json.JSONDecodeError:
            network[key] = value
    card = init_card(
        args.weights,
        args.architecture,
        Path(args.out),
        image_size=tuple(args.image_size),
        channels=args.channels,
        card_id=args.id,
        version=args.version,
        labels=tuple(args.labels),
        latent_dim=args.latent_dim,
        network=network,
        modality=args.modality,
        anatomy=args.anatomy,
        licence=args.licence,
    )
    todo = placeholders(card)
    print(f"wrote {args.out} ({card.ref}, weights sha256 {card.weights.sha256[:12]}...)")
    if todo:
        print(f"fill in: {', '.join(todo)}; then: synthmed generators check {args.out} {args.weights}")
    return 0


def cmd_import_medigan_model(args: argparse.Namespace) -> int:
    from generators.conformance import register
    from generators.medigan_package import import_medigan_model

    with tempfile.TemporaryDirectory(prefix="synthmed-medigan-") as tmp:
        card_path = import_medigan_model(
            args.package,
            Path(tmp) / "model",
            allow_code=args.allow_code,
            model_id=args.model_id,
            global_json=args.global_json,
            card_id=args.id,
            version=args.version,
            output_range=args.output_range,
            python=args.python,
        )
        entry, report = register(card_path, None, args.registry, n=args.n, allow_code=args.allow_code)
    print(report.summary())
    print(f"registered {entry.card.ref} at {entry.path.parent}; generate with --allow-code")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from generators.api import export

    written = export(args.ref, args.format, Path(args.out), allow_code=args.allow_code)
    if args.format == "bundle":
        print(f"wrote MONAI bundle {written}; run it with:")
        print(f"  python -m monai.bundle run --config_file {written}/configs/inference.json --bundle_root {written}")
    else:
        print(f"wrote {written} and {written.parent / 'card.yaml'}; in Python: torch.jit.load(path)(latent)")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from generators.conformance import check_conformance
    from generators.ship import ship_generator

    out = Path(args.out)
    config = Path(args.config).resolve()
    card = ship_generator(config.parent, args.pipeline, args.id, out, config=config)
    report = check_conformance(out / "card.yaml")
    if not report.passed:
        print(report.summary(), file=sys.stderr)
        return 1
    measured = ", ".join(f"{k} {m.value:.4g}" for k, m in card.metrics.items())
    print(f"wrote {out / 'card.yaml'} ({card.ref}; conformance ok): {measured}")
    return 0


def cmd_import_bundle(args: argparse.Namespace) -> int:
    from generators.bundle_import import import_bundle, install_bundle
    from generators.conformance import register

    card = import_bundle(
        args.bundle,
        allow_code=args.allow_code,
        card_id=args.id,
        modality=args.modality,
        anatomy=args.anatomy,
        latent_distribution=args.latent_distribution,
        config_file=args.config_file,
    )
    with tempfile.TemporaryDirectory(prefix="synthmed-bundle-") as tmp:
        card_path = install_bundle(args.bundle, Path(tmp) / "bundle", card)
        entry, report = register(card_path, None, args.registry, allow_code=args.allow_code)
    print(report.summary())
    print(f"registered {entry.card.ref} at {entry.path.parent}")
    return 0


def cmd_import_medigan(args: argparse.Namespace) -> int:
    from generators.medigan import import_medigan
    from generators.registry import list_entries, user_registry_dir

    out = Path(args.out) if args.out else user_registry_dir() / "medigan"
    before = {entry.card.ref: entry.card for entry in list_entries()}
    cards = import_medigan(args.global_json, out)
    same = sum(1 for card in cards if before.get(card.ref) == card)
    updated = sum(1 for card in cards if card.ref in before and before[card.ref] != card)
    print(
        f"imported {len(cards)} medigan cards into {out} (weights unavailable: listed for search and ranking); "
        f"{len(cards) - same - updated} new, {updated} updated, {same} identical to a card already registered "
        "(each id@version is listed once)"
    )
    return 0


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def _search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="*", help="search terms, one per argument (quote one with spaces)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--match",
        choices=("all", "any"),
        default="all",
        help="all: every term must match (default; medigan AND); any: one is enough (medigan OR)",
    )
    parser.add_argument(
        "--substring",
        action="store_true",
        help="a term may be part of a value or of the card's text (default: whole values, as medigan)",
    )
    parser.add_argument("--case-sensitive", action="store_true", help="default: case-insensitive, as medigan")
    parser.add_argument("--keys", action="store_true", help="also match selection keys (medigan are_keys_also_matched)")
    parser.add_argument(
        "--order",
        choices=("asc", "desc"),
        default=None,
        help="sort by the metric's value ascending or descending (default: best first by the metric's direction)",
    )
    _json_flag(parser)


def _code_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-code",
        action="store_true",
        help="allow models whose loading runs code from their files (TorchScript, bundle configs); trusted sources only",
    )


def add_generator_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generators", help="the generator zoo: find, use, contribute, export, import")
    gsub = gen.add_subparsers(dest="generators_command", required=True)

    listing = gsub.add_parser("list", help="all cards")
    listing.add_argument("--available", action="store_true", help="only generators whose weights are here")
    _json_flag(listing)
    listing.set_defaults(func=cmd_list)

    search = gsub.add_parser(
        "search",
        help="cards matching every term (whole values, as medigan) and KEY=VALUE filters, e.g. "
        "'search mammography 128x128 dcgan'",
    )
    _search_flags(search)
    search.add_argument("--rank-by", metavar="METRIC", help="order by this metric, best first (e.g. fid)")
    search.set_defaults(func=cmd_search)

    rank = gsub.add_parser("rank", help="rank generators by a metric (best first), e.g. 'rank fid mammography'")
    rank.add_argument("metric")
    _search_flags(rank)
    rank.set_defaults(func=cmd_rank)

    show = gsub.add_parser("show", help="print a card, or one value of it with --key")
    show.add_argument(
        "ref", help="id or id@version; a medigan model number (1) or id (00001_DCGAN_MMG_CALC_ROI) also works"
    )
    show.add_argument(
        "--key",
        metavar="A.B.C",
        help="print the value at this dotted key: card fields (metrics.fid.value) or a medigan card's "
        "global.json entry (selection.performance.FID, description.trained_date)",
    )
    _json_flag(show)
    show.set_defaults(func=cmd_show)

    keys = gsub.add_parser("keys", help="selection keys search matches against; with KEY, its values and counts")
    keys.add_argument("key", nargs="?", help="a key, dotted for nested ones (modality, performance.FID)")
    _json_flag(keys)
    keys.set_defaults(func=cmd_keys)

    generate = gsub.add_parser("generate", help="generate images to Parquet shards or a PNG folder")
    generate.add_argument("ref")
    generate.add_argument("-n", type=int, default=16)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--condition", default=None, help="class label (default: cycle through labels)")
    generate.add_argument("--output", required=True)
    generate.add_argument("--format", choices=("parquet", "png"), default="parquet")
    generate.add_argument("--device", default="cpu")
    generate.add_argument(
        "--compile", action="store_true", help="torch.compile the network (pays off from ~20,000 images)"
    )
    _code_flag(generate)
    generate.set_defaults(func=cmd_generate)

    visualise = gsub.add_parser("visualise", help="sample grid and latent interpolation PNGs")
    visualise.add_argument("ref")
    visualise.add_argument("--out", required=True)
    visualise.add_argument("-n", type=int, default=16, help="samples in the grid")
    visualise.add_argument("--seed", type=int, default=0)
    visualise.add_argument("--rows", type=int, default=4, help="interpolation rows")
    visualise.add_argument("--steps", type=int, default=8, help="images per interpolation row")
    visualise.add_argument("--device", default="cpu")
    _code_flag(visualise)
    visualise.set_defaults(func=cmd_visualise)

    check = gsub.add_parser("check", help="run the conformance check on a card + weights (exit 1 on failure)")
    check.add_argument("card")
    check.add_argument("weights", nargs="?", help="default: the card's weights.file next to it")
    check.add_argument("-n", type=int, default=4, help="samples per generate call")
    _code_flag(check)
    check.set_defaults(func=cmd_check)

    add = gsub.add_parser("add", help="conformance-check a card + weights and copy them into the user registry")
    add.add_argument("card")
    add.add_argument("weights", nargs="?", help="default: the card's weights.file next to it")
    add.add_argument("--registry", help="registry directory (default: $SYNTHMED_REGISTRY or ~/.synthmed/generators)")
    add.add_argument("-n", type=int, default=4, help="samples per generate call")
    _code_flag(add)
    add.set_defaults(func=cmd_add)

    schema = gsub.add_parser("schema", help="print the model card's JSON schema")
    schema.set_defaults(func=cmd_schema)

    card_init = gsub.add_parser(
        "card-init", help="write a starting card for trained weights (sha256 filled in, TODO placeholders)"
    )
    card_init.add_argument("--weights", required=True, help="the weights file (safetensors, .pt or TorchScript .ts)")
    card_init.add_argument("--architecture", required=True, help="cgan, dcgan, ..., or a contributed architecture")
    card_init.add_argument("--out", required=True, help="card file to write, e.g. card.yaml next to the weights")
    card_init.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    card_init.add_argument("--channels", type=int, default=1)
    card_init.add_argument("--id", help="card id (default: contrib/<weights file stem>)")
    card_init.add_argument("--version", default="0.1.0")
    card_init.add_argument("--labels", nargs="*", default=[], help="class labels, in the network's label order")
    card_init.add_argument("--latent-dim", type=int)
    card_init.add_argument("--network", action="append", default=[], metavar="KEY=VALUE", help="JSON values")
    card_init.add_argument("--modality")
    card_init.add_argument("--anatomy")
    card_init.add_argument("--licence")
    card_init.set_defaults(func=cmd_card_init)

    medigan_model = gsub.add_parser(
        "import-medigan-model",
        help="register a downloaded medigan model package (.zip); runs its code in a subprocess (--allow-code)",
    )
    medigan_model.add_argument("package", help="the model's zip, e.g. 00001_DCGAN_MMG_CALC_ROI.zip from Zenodo")
    medigan_model.add_argument("--model-id", help="medigan model id (default: the zip's name)")
    medigan_model.add_argument(
        "--global-json", help="medigan global.json/metadata.json with the entry (default: in the zip, then medigan's)"
    )
    medigan_model.add_argument("--id", help="card id (default: medigan/<model id>)")
    medigan_model.add_argument("--version", help="card version (default: medigan's version + '+package')")
    medigan_model.add_argument(
        "--output-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="raw range of float outputs"
    )
    medigan_model.add_argument("--python", help="interpreter with the package's dependencies (default: this one)")
    medigan_model.add_argument(
        "--registry", help="registry directory (default: $SYNTHMED_REGISTRY or ~/.synthmed/generators)"
    )
    medigan_model.add_argument("-n", type=int, default=4, help="samples per generate call of the conformance check")
    _code_flag(medigan_model)
    medigan_model.set_defaults(func=cmd_import_medigan_model)

    export = gsub.add_parser("export", help="export a generator as a MONAI bundle or TorchScript")
    export.add_argument("ref")
    export.add_argument("--format", choices=("bundle", "torchscript"), required=True)
    export.add_argument("--out", required=True, help="output directory (new)")
    _code_flag(export)
    export.set_defaults(func=cmd_export)

    ship = gsub.add_parser(
        "ship", help="copy a pipeline's trained generator to a zoo folder, with the run's measured metrics on its card"
    )
    ship.add_argument("--pipeline", required=True)
    ship.add_argument("--config", default="pipelines.yaml")
    ship.add_argument("--id", required=True, help="card id of the shipped generator, e.g. synthmed/mni152-cgan")
    ship.add_argument("--out", required=True, help="folder for card.yaml + weights, e.g. generators/zoo/mni152_cgan")
    ship.set_defaults(func=cmd_ship)

    bundle = gsub.add_parser("import-bundle", help="import a MONAI bundle directory into the user registry")
    bundle.add_argument(
        "bundle", help="bundle root (configs/metadata.json, configs/inference.json|yaml, models/model.pt)"
    )
    bundle.add_argument("--id", help="card id (default: from the bundle name, or the card of a synthmed export)")
    bundle.add_argument(
        "--config-file",
        help="inference config relative to the bundle root (default: configs/inference.json, .yaml or .yml)",
    )
    bundle.add_argument("--modality", default="unspecified")
    bundle.add_argument("--anatomy", default="unspecified")
    bundle.add_argument("--latent-distribution", choices=("normal", "uniform"), default=None)
    bundle.add_argument("--registry", help="registry directory (default: $SYNTHMED_REGISTRY or ~/.synthmed/generators)")
    _code_flag(bundle)
    bundle.set_defaults(func=cmd_import_bundle)

    medigan = gsub.add_parser("import-medigan", help="write cards for medigan's global.json (no download)")
    medigan.add_argument("global_json")
    medigan.add_argument("--out", help="directory for the cards (default: <user registry>/medigan)")
    medigan.set_defaults(func=cmd_import_medigan)
