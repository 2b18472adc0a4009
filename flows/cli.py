"""The ``synthmed`` command line.

    synthmed run [--pipeline demo] [--config pipelines.yaml]   the Prefect flow, end to end
    synthmed stage VERB --pipeline NAME                         one stage (what dvc.yaml calls)
    synthmed validate [--config pipelines.yaml]                 check the pipelines file
    synthmed serve --pipeline NAME --cron "0 2 * * *"           a scheduled Prefect deployment, served here
    synthmed remote s3 s3://bucket/prefix [--endpoint-url URL]  use an S3 (or MinIO) bucket as the DVC remote
    synthmed publish --pipeline NAME                            copy reports + metrics to storage.results_uri
    synthmed init DIR --from-folder PATH [--task T]             a new project with one pipeline from a folder
    synthmed new-pipeline --from-folder PATH [--task T]         inspect a folder, add a pipeline + its DVC stages
    synthmed export-synthetic --pipeline P --format F --out D   the kept synthetic images as PNG / NIfTI / DICOM
    synthmed baseline --pipeline P [--push]                     commit P's results as the baseline of dvc exp show
    synthmed exp-show --pipeline P [DVC exp show args]          dvc exp show: verdict, delta, AUC, changed params
    synthmed exp-diff [A [B]] --pipeline P                      dvc metrics diff + dvc plots diff of P's files
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

from flows.console import configure_console, telemetry_off
from generators.errors import ConfigError, QualityGateError, SynthmedError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
telemetry_off()  # before Prefect is imported: no heartbeat to prefect.io, no SDK analytics (flows/console.py)


def _config_path(value: str) -> Path:
    return Path(value).resolve()


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


class _NoTracebackForExpectedErrors(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a
    :class:`SynthmedError` (a problem the user can fix, printed as one ``error:`` line at
    the end) the log line stays and the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SynthmedError):
            record.exc_info, record.exc_text = None, None
        return True


def cmd_run(args: argparse.Namespace) -> int:
    """The flow, under the pipeline's lock (a second run of the same pipeline fails at once,
    before any server starts) and with a temporary Prefect server that dies with this
    process (flows/ephemeral.py) unless ``PREFECT_API_URL`` names one."""
    from flows.ephemeral import start_tied_server
    from flows.pipeline import AugmentParams, augment
    from tasks.config import load_pipeline
    from tasks.lock import pipeline_lock
    from tasks.paths import PipelinePaths

    params = AugmentParams(
        pipeline=args.pipeline,
        config=str(args.config),
        dvc_commit=not args.no_dvc,
        dvc_push=args.push,
        shard_workers=args.shard_workers,
        runner=args.runner,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
    )
    cfg = load_pipeline(args.pipeline, args.config)  # a config error before anything starts
    from flows.scaleout import resolve_runner

    resolve_runner(  # and a runner error
        cfg.runner,
        kind=args.runner,
        workers=args.dask_workers,
        address=args.dask_address,
        shard_workers=args.shard_workers,
    )
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForExpectedErrors())
    with pipeline_lock(PipelinePaths(args.config.parent, args.pipeline)):
        start_tied_server()
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
    try:
        summary = run_stage(args.verb, cfg, paths, force=not args.skip_current)
    except QualityGateError as exc:
        # under DVC a rejected set is a result, not a crash: the filter's outputs are written,
        # retrain and report run, and summary.json's verdict says REJECTED (dvc exp show)
        print(f"warning: {' '.join(str(exc).split())}; the report's verdict will be REJECTED", file=sys.stderr)
        return 0
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.config import load_pipelines

    pipelines = load_pipelines(args.config).pipelines
    print(f"{args.config.name}: ok ({', '.join(sorted(pipelines))})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import build_deployment, serve_deployments

    deployment = build_deployment(
        args.pipeline,
        args.config,
        cron=args.cron,
        timezone=args.timezone,
        name=args.name,
        push=args.push,
        shard_workers=args.shard_workers,
        paused=args.paused,
        runner=args.runner,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
    )
    serve_deployments(deployment, limit=args.limit)
    return 0


def cmd_remote_s3(args: argparse.Namespace) -> int:
    from flows.versioning import configure_s3_remote
    from tasks.storage import endpoint_url

    settings = configure_s3_remote(
        args.root,
        args.url,
        name=args.name,
        endpoint_url=args.endpoint_url or endpoint_url(),
        default=not args.no_default,
    )
    print(" ".join(f"{key}={value}" for key, value in settings.items()))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths
    from tasks.storage import publish_results

    cfg = load_pipeline(args.pipeline, args.config)
    if not cfg.storage.results_uri:
        raise ConfigError(
            f"pipeline '{args.pipeline}' has no storage.results_uri; add `storage: {{results_uri: s3://bucket/prefix}}`"
        )
    written = publish_results(cfg, PipelinePaths(args.config.parent, args.pipeline))
    print(f"published {len(written)} files to {cfg.storage.results_uri}/{args.pipeline}/")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    """Print ``dvc.yaml`` for every pipeline of the config (or the ``--pipeline`` ones);
    ``--write`` writes it beside the config, ``--check`` exits 1 when that file differs."""
    from flows.versioning import DVC_YAML, check_dvc_yaml, render_dvc_yaml

    root, with_code = args.config.parent, not args.no_code
    if args.pipeline and (args.check or args.write):
        raise ConfigError("dvc-yaml: --write and --check cover every pipeline of the config; drop --pipeline")
    if args.check:
        problem = check_dvc_yaml(root, args.config, with_code=with_code)
        print(f"error: {problem}" if problem else f"{root / DVC_YAML}: up to date with {args.config.name}")
        return 1 if problem else 0
    text = render_dvc_yaml(args.config, args.pipeline, with_code=with_code)
    if not args.write:
        print(text, end="")
        return 0
    (root / DVC_YAML).write_text(text)
    print(f"wrote {root / DVC_YAML}")
    return 0


def cmd_new_pipeline(args: argparse.Namespace) -> int:
    """Inspect the data, append a pipeline to pipelines.yaml (validated) and render its DVC
    stages (flows/scaffold.py); ``--dry-run`` only prints what it found and would write."""
    from flows.scaffold import entry_text, new_pipeline, summary_lines

    scaffold = new_pipeline(args.config, args.from_folder, args.task, args.name, dry_run=args.dry_run)
    print("\n".join(summary_lines(scaffold)))
    if args.dry_run:
        print(f"would append to {args.config.name} (--dry-run: nothing written):")
        print(entry_text(scaffold.name, scaffold.entry), end="")
        return 0
    for item in scaffold.written:
        print(f"wrote: {item}")
    print(f"next: synthmed run --pipeline {scaffold.name}   (or: dvc repro)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from flows.scaffold import init_project, summary_lines

    scaffold = init_project(args.directory, args.from_folder, args.task, args.name)
    print("\n".join(summary_lines(scaffold)))
    for item in scaffold.written:
        print(f"wrote: {item}")
    print(f"next: cd {args.directory} && synthmed run --pipeline {scaffold.name}")
    return 0


def cmd_export_synthetic(args: argparse.Namespace) -> int:
    from tasks.config import load_pipeline
    from tasks.export import export_synthetic
    from tasks.paths import PipelinePaths

    load_pipeline(args.pipeline, args.config)  # a known pipeline, a valid file
    summary = export_synthetic(
        PipelinePaths(args.config.parent, args.pipeline),
        args.format,
        args.out,
        dataset=args.dataset,
        allow_rejected=args.allow_rejected,
    )
    per_class = ", ".join(f"{label} {n}" for label, n in summary["per_class"].items())
    print(f"exported {summary['images']} images ({per_class}) as {args.format} to {args.out}")
    print(f"manifest: {args.out / 'manifest.csv'}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from flows.experiments import record_baseline
    from tasks.config import load_pipeline

    load_pipeline(args.pipeline, args.config)  # an unknown pipeline or a bad config: one line, nothing run

    done = record_baseline(args.config.parent, args.pipeline, args.config, push=args.push)
    if done["recorded"]:
        print(f"committed {done['commit']}: {done['message']}")
    else:
        print(f"HEAD ({done['commit']}) already holds these results: nothing to commit")
    return 0


def cmd_exp_show(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """:func:`flows.experiments.show_table`: the ``dvc exp show`` command (printed first, so
    it can be typed or changed by hand) and its table, within ``--width`` columns (the
    terminal's, or 160 when not a terminal) when it can be; further arguments go to DVC."""
    import shutil

    from flows.experiments import command_line, show_table
    from tasks.config import load_pipeline

    load_pipeline(args.pipeline, args.config)  # an unknown pipeline: one line naming the known ones
    width = args.width or (shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 160)
    shown = show_table(args.config.parent, args.pipeline, width, list(extra))
    print(command_line(shown.args), flush=True)
    sys.stdout.write(shown.stdout)
    sys.stderr.write(shown.stderr)
    if shown.returncode == 0 and shown.left_out:
        print(f"(left out to fit {width} columns: {', '.join(shown.left_out)}; see synthmed exp-diff)")
    if shown.returncode == 0 and shown.width > width:
        print(f"({shown.width} columns, wider than {width}: each swept param adds a column)")
    return shown.returncode


def cmd_exp_diff(args: argparse.Namespace) -> int:
    """``dvc metrics diff`` then ``dvc plots diff`` (:func:`flows.experiments.exp_diff_args`),
    each printed before it runs; the first failure's exit status is returned."""
    import subprocess

    from flows.experiments import command_line, exp_diff_args
    from tasks.config import load_pipeline

    load_pipeline(args.pipeline, args.config)
    if len(args.revs) > 2:
        raise ConfigError(f"exp-diff compares at most two revisions, got {len(args.revs)}: {' '.join(args.revs)}")
    out_dir = args.out or f"dvc_plots/{args.pipeline}"
    (args.config.parent / out_dir).mkdir(parents=True, exist_ok=True)  # DVC fails when the parent is missing
    for dvc_args in exp_diff_args(args.pipeline, args.revs, out_dir):
        print(command_line(dvc_args), flush=True)
        code = subprocess.run([sys.executable, "-m", "dvc", *dvc_args], cwd=args.config.parent).returncode
        if code != 0:
            return code
    return 0


def _add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runner",
        choices=["local", "threads", "dask"],
        default=None,
        help="where synthesis shards and retrain runs go (default: the pipeline's runner.kind, else local)",
    )
    parser.add_argument(
        "--dask-address", default=None, help="tcp://host:port of a running Dask scheduler (implies dask)"
    )
    parser.add_argument(
        "--dask-workers",
        type=_positive_int,
        default=None,
        help="worker processes of the local Dask cluster started for each run (default: runner.workers, 2)",
    )


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
    run.add_argument(
        "--shard-workers", type=_positive_int, default=1, help="synthesis shards made in parallel (threads)"
    )
    _add_runner_arguments(run)
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve a scheduled deployment of the flow (needs PREFECT_API_URL)")
    serve.add_argument("--pipeline", default="demo")
    serve.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    serve.add_argument("--cron", default="0 2 * * *", help="five-field cron schedule (default: nightly at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="IANA time zone of the schedule")
    serve.add_argument("--name", default=None, help="deployment name (default: <pipeline>-nightly)")
    serve.add_argument("--push", action="store_true", help="each run pushes its outputs to the DVC remote")
    serve.add_argument(
        "--shard-workers", type=_positive_int, default=1, help="synthesis shards made in parallel (threads)"
    )
    _add_runner_arguments(serve)
    serve.add_argument("--paused", action="store_true", help="register with the schedule paused")
    serve.add_argument(
        "--limit", type=_positive_int, default=None, help="at most this many runs at once on this machine"
    )
    serve.set_defaults(func=cmd_serve)

    remote = sub.add_parser("remote", help="configure the DVC remote")
    remote_sub = remote.add_subparsers(dest="remote_kind", required=True)
    s3 = remote_sub.add_parser("s3", help="an S3 or S3-compatible bucket (credentials from AWS_* env vars)")
    s3.add_argument("url", help="s3://bucket/prefix")
    s3.add_argument("--name", default="s3store", help="remote name (default: s3store)")
    s3.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: $SYNTHMED_S3_ENDPOINT_URL)")
    s3.add_argument("--no-default", action="store_true", help="add it without making it the default remote")
    s3.add_argument("--root", type=_config_path, default=_config_path("."), help="the DVC project (default: .)")
    s3.set_defaults(func=cmd_remote_s3)

    publish = sub.add_parser("publish", help="copy reports and metrics to the pipeline's storage.results_uri")
    publish.add_argument("--pipeline", default="demo")
    publish.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    publish.set_defaults(func=cmd_publish)

    stage = sub.add_parser("stage", help="run one stage (dvc.yaml calls this)")
    stage.add_argument("verb", choices=ORDER)
    stage.add_argument("--pipeline", default="demo")
    stage.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    stage.add_argument("--skip-current", action="store_true", help="skip when outputs are up to date")
    stage.set_defaults(func=cmd_stage)

    validate = sub.add_parser("validate", help="validate pipelines.yaml")
    validate.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("dvc-yaml", help="render dvc.yaml: every pipeline's stages and plots")
    render.add_argument(
        "--pipeline", action="append", default=None, help="only this pipeline (repeatable; default: all of them)"
    )
    render.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    render.add_argument("--no-code", action="store_true", help="omit code deps (for projects outside this repo)")
    mode = render.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write dvc.yaml beside the config (default: print it)")
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is not what would be rendered")
    render.set_defaults(func=cmd_dvc_yaml)

    tasks_choice = ("classification", "segmentation")
    scaffold = sub.add_parser(
        "new-pipeline", help="inspect a folder of class sub-folders (or a CSV) and add a pipeline"
    )
    scaffold.add_argument(
        "--from-folder", type=Path, required=True, help="folder with one sub-folder per class, or a CSV"
    )
    scaffold.add_argument("--task", choices=tasks_choice, default="classification")
    scaffold.add_argument("--name", default=None, help="pipeline name (default: the folder's name)")
    scaffold.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    scaffold.add_argument("--dry-run", action="store_true", help="print what was found and the entry; write nothing")
    scaffold.set_defaults(func=cmd_new_pipeline)

    init = sub.add_parser("init", help="a new project: pipelines.yaml from a folder, git, DVC and dvc.yaml")
    init.add_argument("directory", type=_config_path, help="the project folder (created)")
    init.add_argument("--from-folder", type=Path, required=True, help="folder with one sub-folder per class, or a CSV")
    init.add_argument("--task", choices=tasks_choice, default="classification")
    init.add_argument("--name", default=None, help="pipeline name (default: the folder's name)")
    init.set_defaults(func=cmd_init)

    export = sub.add_parser("export-synthetic", help="write a pipeline's synthetic images as PNG, NIfTI or DICOM files")
    export.add_argument("--pipeline", default="demo")
    export.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    export.add_argument("--format", choices=("png", "nifti", "dicom"), required=True)
    export.add_argument("--out", type=_config_path, required=True, help="a new or empty folder")
    export.add_argument(
        "--dataset",
        choices=("filtered", "synthetic"),
        default="filtered",
        help="kept images (default) or all generated",
    )
    export.add_argument(
        "--allow-rejected", action="store_true", help="export a set the quality gate rejected (to inspect it)"
    )
    export.set_defaults(func=cmd_export_synthetic)

    baseline = sub.add_parser("baseline", help="commit a pipeline's results as the baseline of dvc exp show")
    baseline.add_argument("--pipeline", default="demo")
    baseline.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    baseline.add_argument("--push", action="store_true", help="also dvc push the pipeline's outputs")
    baseline.set_defaults(func=cmd_baseline)

    exp_show = sub.add_parser(
        "exp-show",
        help="dvc exp show for one pipeline: verdict, delta and its interval, AUC, changed params",
        description="Further arguments (e.g. --md, --sort-by demo.delta, -A) are passed to dvc exp show.",
    )
    exp_show.add_argument("--pipeline", default="demo")
    exp_show.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    exp_show.add_argument(
        "--width", type=_positive_int, default=None, help="columns to fit (default: the terminal's, else 160)"
    )
    exp_show.set_defaults(func=cmd_exp_show, passes_extra=True)

    exp_diff = sub.add_parser(
        "exp-diff", help="dvc metrics diff and dvc plots diff of one pipeline's summary and plots"
    )
    exp_diff.add_argument("revs", nargs="*", help="0-2 experiments or git revisions (DVC's defaults: HEAD, workspace)")
    exp_diff.add_argument("--pipeline", default="demo")
    exp_diff.add_argument("--config", type=_config_path, default=_config_path("pipelines.yaml"))
    exp_diff.add_argument("-o", "--out", default=None, help="HTML folder (default: dvc_plots/<pipeline>)")
    exp_diff.set_defaults(func=cmd_exp_diff)

    from flows.generators_cli import add_generator_commands

    add_generator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_extra", False):
        parser.parse_args(argv)  # argparse's own one-line error for the unknown arguments (exit 2)
    from tasks.stages import ORDER

    configure_console(args.verbose, stages=ORDER)  # one line per event, no library tracebacks (flows/console.py)
    try:
        return args.func(args, extra) if getattr(args, "passes_extra", False) else args.func(args)
    except SynthmedError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever raised it
        return 2
    except BrokenPipeError:  # `synthmed generators list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as exc:  # a bug, not a user error: one line here, the traceback with -v
        if args.verbose:
            raise
        detail = " ".join(str(exc).split())[:300]
        print(
            f"error: unexpected {type(exc).__name__}: {detail}; this is a bug: rerun with -v for the traceback "
            "and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
