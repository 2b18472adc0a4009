"""``synthmed generators ...``: list, search, show and generate from the zoo."""

from __future__ import annotations

import argparse
import json
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


def _print_entries(entries: list) -> None:
    for entry in entries:
        card = entry.card
        h, w = card.image_size
        status = "" if card.available else "  [weights unavailable]"
        metrics = ", ".join(f"{k}={m.value:g}" for k, m in sorted(card.metrics.items()))
        print(f"{card.ref:45s} {card.architecture:13s} {card.modality:12s} {card.anatomy:14s} {h}x{w}  {metrics}{status}")


def cmd_list(args: argparse.Namespace) -> int:
    from generators.registry import list_entries

    _print_entries(list_entries())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from generators.registry import search

    _print_entries(search(" ".join(args.query), _filters(args.filter), args.rank_by))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from generators.registry import find

    entry = find(args.ref)
    print(json.dumps(entry.card.model_dump(mode="json"), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from generators.api import generate

    out = generate(args.ref, args.n, seed=args.seed, condition=args.condition, output=Path(args.output), fmt=args.format)
    print(f"wrote {args.n} images to {out}")
    return 0


def add_generator_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generators", help="the generator zoo: list, search, show, generate")
    gsub = gen.add_subparsers(dest="generators_command", required=True)
    gsub.add_parser("list", help="all cards").set_defaults(func=cmd_list)
    search = gsub.add_parser("search", help="free text and KEY=VALUE filters, ranked by a metric")
    search.add_argument("query", nargs="*")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--rank-by", metavar="METRIC")
    search.set_defaults(func=cmd_search)
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
    generate.set_defaults(func=cmd_generate)
