"""The ``synthmed`` command line.

    synthmed run [--pipeline demo] [--config pipelines.yaml]   the Prefect flow, end to end
    synthmed stage VERB --pipeline NAME                         one stage (what dvc.yaml calls)
    synthmed validate [--config pipelines.yaml]                 check the pipelines file
    synthmed generators ...                                     the generator zoo

Errors print one line (``error: ...``) and exit with status 2; no traceback for
problems the user can fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from generators.errors import SynthmedError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _config_path(value: str) -> Path:
    return Path(value).resolve()


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import AugmentParams, augment

    params = AugmentParams(
        pipeline=args.pipeline, config=str(args.config), dvc_commit=not args.no_dvc, dvc_push=args.push
    )
    summaries = augment(params)
    report = summaries["report"]
    retrain = summaries["retrain"]
    print(f"report: {report.get('report')}")
    if "verdict" in retrain:
        print(f"verdict: {retrain['verdict']}")
    skipped = [verb for verb, s in summaries.items() if isinstance(s, dict) and s.get("skipped")]
    if skipped:
        print(f"up to date (skipped): {', '.join(skipped)}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths
    from tasks.stages import run_stage

    cfg = load_pipeline(args.pipeline, args.config)
    paths = PipelinePaths(args.config.parent, args.pipeline)
    summary = run_stage(args.verb, cfg, paths, force=not args.skip_current)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.config import load_pipelines

    pipelines = load_pipelines(args.config).pipelines
    print(f"{args.config.name}: ok ({', '.join(sorted(pipelines))})")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    import yaml

    from tasks.config import load_pipeline
    from tasks.stages import dvc_yaml

    cfg = load_pipeline(args.pipeline, args.config)
    header = "# Rendered by `synthmed dvc-yaml --pipeline %s` from tasks/stages.py; do not edit by hand.\n" % args.pipeline
    print(header + yaml.safe_dump(dvc_yaml(args.pipeline, cfg, with_code=not args.no_code), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tasks.stages import ORDER

    parser = argparse.ArgumentParser(prog="synthmed", description="Synthetic medical images, made, checked, versioned.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline end to end with Prefect (local engine by default)")
    run.add_argument("--pipeline", default="demo")
    run.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    run.add_argument("--no-dvc", action="store_true", help="do not record outputs with dvc commit")
    run.add_argument("--push", action="store_true", help="dvc push the outputs to the configured remote")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage (dvc.yaml calls this)")
    stage.add_argument("verb", choices=ORDER)
    stage.add_argument("--pipeline", default="demo")
    stage.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    stage.add_argument("--skip-current", action="store_true", help="skip when outputs are up to date")
    stage.set_defaults(func=cmd_stage)

    validate = sub.add_parser("validate", help="validate pipelines.yaml")
    validate.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("dvc-yaml", help="print the dvc.yaml stages of a pipeline")
    render.add_argument("--pipeline", default="demo")
    render.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    render.add_argument("--no-code", action="store_true", help="omit code deps (for projects outside this repo)")
    render.set_defaults(func=cmd_dvc_yaml)

    from flows.generators_cli import add_generator_commands

    add_generator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except SynthmedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
