"""A Dask cluster on SLURM for `synthmed run`: one SLURM job per Dask worker, one GPU each.

An example, not run in CI (no SLURM there). Edit the partition, account, memory and
walltime for your site. Run it from the project directory on the shared filesystem, on a
node that may run long processes (inside `salloc`, or an sbatch job of its own): the Dask
scheduler lives in this process, and so does the driver (`synthmed run`).

    pip install dask-jobqueue            # not a synthmed dependency
    export PREFECT_API_URL=http://prefect.example.org:4200/api
    python infra/dask/slurm_cluster.py --jobs 4 --pipeline demo --venv /shared/venvs/synthmed

Every worker needs the project directory at the same path and a Prefect API it can reach
(docs/scaleout.md). The pipeline should set `device: cuda` and `runner.gpus_per_worker: 1`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

try:
    from dask_jobqueue import SLURMCluster
except ImportError:  # keeps `python -m py_compile` and `--help` working without it
    SLURMCluster = None

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Start Dask GPU workers as SLURM jobs and run a synthmed pipeline.")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs = Dask workers = GPUs (default 4)")
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--project-dir", default=os.getcwd(), help="the project on the shared filesystem")
    parser.add_argument("--venv", default=sys.prefix, help="virtual environment on the shared filesystem")
    parser.add_argument("--threads", type=int, default=4, help="CPU cores per job: the pipeline's `threads`")
    parser.add_argument("--memory", default="32GB")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", "gpu"))
    parser.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"))
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="start the cluster and print the synthmed command instead of running it",
    )
    return parser.parse_args()


def prefect_api_url() -> str:
    """PREFECT_API_URL, which the workers on the compute nodes must be able to reach."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        sys.exit("error: set PREFECT_API_URL to a Prefect server the compute nodes can reach (docs/scaleout.md)")
    if (urlparse(url).hostname or "") in LOOPBACK:
        sys.exit(
            f"error: PREFECT_API_URL={url} is loopback; run `prefect server start --host 0.0.0.0` on a shared host"
        )
    return url


def make_cluster(args: argparse.Namespace, api_url: str):
    """One worker process per job, one Dask thread (one task at a time), `threads` cores
    for torch, one GPU, and the Dask resource GPU=1 that the pipeline's tasks ask for."""
    project = Path(args.project_dir).resolve()
    return SLURMCluster(
        queue=args.partition,
        account=args.account,
        cores=1,  # Dask threads per worker: one task at a time
        job_cpu=args.threads,  # cores SLURM books: torch uses the pipeline's `threads`
        processes=1,
        memory=args.memory,
        walltime=args.walltime,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1"],
        job_script_prologue=[
            f"source {Path(args.venv) / 'bin' / 'activate'}",
            f"cd {project}",  # the same path as the driver's project directory
            f"export PREFECT_API_URL={api_url}",
            "export NO_ALBUMENTATIONS_UPDATE=1",
        ],
    )


def main() -> int:
    args = parse_args()
    if SLURMCluster is None:
        print("error: dask_jobqueue is not installed; pip install dask-jobqueue", file=sys.stderr)
        return 2
    api_url = prefect_api_url()
    from distributed import Client

    with make_cluster(args, api_url) as cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        print(f"scheduler: {cluster.scheduler_address}  dashboard: {cluster.dashboard_link}", flush=True)
        synthmed = str(Path(args.venv) / "bin" / "synthmed")
        command = [synthmed, "run", "--pipeline", args.pipeline, "--dask-address", cluster.scheduler_address]
        if args.print_only:
            print("in the project directory, run: " + " ".join(command), flush=True)
            input("press Enter to stop the cluster\n")
            return 0
        client.wait_for_workers(1)  # GPU tasks need at least one worker with GPU=1 at the start
        return subprocess.run(command, cwd=args.project_dir, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
