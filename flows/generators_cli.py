"""``synthmed generators ...``: the generator zoo from the command line.

list | search | rank | show            find a generator
generate | visualise                   use one
check | add                            contribute one (conformance check, then register)
export                                 MONAI bundle or TorchScript
import-bundle | import-medigan         bring in MONAI bundles and medigan's index
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


def _print_entries(entries: list, metric: str | None = None) -> None:
    if not entries:
        print("no generators match")
    for entry in entries:
        card = entry.card
        h, w = card.image_size
        status = "" if card.available else "  [weights unavailable]"
        if metric:
            chosen = card.metrics.get(metric)
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
    _print_entries(entries)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from generators.registry import search

    _print_entries(search(" ".join(args.query), _filters(args.filter), args.rank_by), args.rank_by)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from generators.registry import search

    _print_entries(search(" ".join(args.query), _filters(args.filter), args.metric), args.metric)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from generators.registry import find

    entry = find(args.ref)
    print(json.dumps(entry.card.model_dump(mode="json"), indent=2))
    print(f"# card: {entry.path}; weights {'available' if entry.card.available else 'unavailable'}")
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
    from generators.bundle import import_bundle, install_bundle
    from generators.conformance import register

    card = import_bundle(
        args.bundle,
        allow_code=args.allow_code,
        card_id=args.id,
        modality=args.modality,
        anatomy=args.anatomy,
        latent_distribution=args.latent_distribution,
    )
    with tempfile.TemporaryDirectory(prefix="synthmed-bundle-") as tmp:
        card_path = install_bundle(args.bundle, Path(tmp) / "bundle", card)
        entry, report = register(card_path, None, args.registry, allow_code=args.allow_code)
    print(report.summary())
    print(f"registered {entry.card.ref} at {entry.path.parent}")
    return 0


def cmd_import_medigan(args: argparse.Namespace) -> int:
    from generators.medigan import import_medigan
    from generators.registry import user_registry_dir

    out = Path(args.out) if args.out else user_registry_dir() / "medigan"
    cards = import_medigan(args.global_json, out)
    print(f"imported {len(cards)} medigan cards into {out} (weights unavailable: listed for search and ranking)")
    return 0


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
    listing.set_defaults(func=cmd_list)

    search = gsub.add_parser("search", help="free text and KEY=VALUE filters, ranked by a metric")
    search.add_argument("query", nargs="*")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--rank-by", metavar="METRIC")
    search.set_defaults(func=cmd_search)

    rank = gsub.add_parser("rank", help="rank generators by a metric (best first), e.g. 'rank fid mammography'")
    rank.add_argument("metric")
    rank.add_argument("query", nargs="*")
    rank.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    rank.set_defaults(func=cmd_rank)

    show = gsub.add_parser("show", help="print a card")
    show.add_argument("ref", help="id or id@version")
    show.set_defaults(func=cmd_show)

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
    bundle.add_argument("bundle", help="bundle root (configs/metadata.json, configs/inference.json, models/model.pt)")
    bundle.add_argument("--id", help="card id (default: from the bundle name)")
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
