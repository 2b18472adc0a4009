"""S3 storage: ``s3://`` URIs through boto3, for AWS, MinIO and any S3-compatible store.

- Endpoint: ``SYNTHMED_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``, else AWS itself.
- Credentials: from the environment only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  optional ``AWS_SESSION_TOKEN``; without them boto3's role providers apply, e.g. an IAM
  role of the pod or instance). Never from ``pipelines.yaml`` or anything else in git.
- Errors: network hiccups, throttling and 5xx answers raise :class:`TransientError` (the
  only kind the Prefect flow retries); a missing bucket or a rejected key raises
  :class:`DataError` / :class:`ConfigError` with one line that says how to fix it.

Used by ingest (an ``s3`` source is downloaded to a local staging folder, then ingested
exactly like a ``folder`` source) and by the flow (reports and metrics copied to
``storage.results_uri``). Object keys are never logged with file contents; an S3 prefix
of medical images should hold pseudonymised file names only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import urlsplit

from generators.errors import ConfigError, DataError, SynthmedError, TransientError
from tasks.paths import PipelinePaths

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

log = logging.getLogger(__name__)

ENDPOINT_ENVS = ("SYNTHMED_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError"}
)
CREDENTIAL_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
)
T = TypeVar("T")
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class S3Uri:
    """``s3://bucket/prefix`` split in two; ``prefix`` has no leading or trailing '/'."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not uri.startswith("s3://"):
            raise ConfigError(f"expected an s3://bucket/prefix URI, got {redact_url(uri)!r}; start it with s3://")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
        if not BUCKET_PATTERN.fullmatch(bucket):
            raise ConfigError(
                f"{redact_url(uri)!r}: not an S3 bucket name (3-63 lowercase letters, digits, '.', '-'; no "
                "credentials in the URI); expected s3://bucket/prefix, keys in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            )
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ConfigError(f"{uri!r}: '.' and '..' are not allowed in an S3 prefix; give the plain path")
        return cls(bucket, "/".join(parts))

    def key(self, relative: str) -> str:
        """Object key of ``relative`` (posix path) under this prefix."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, relative: str) -> "S3Uri":
        return S3Uri(self.bucket, self.key(relative.strip("/")))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_s3_uri(value: str) -> bool:
    return value.startswith("s3://")


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` for messages: any ``user:password@`` becomes
    ``***@`` and the path, query and fragment (which may carry signed tokens) are dropped."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host = netloc.rpartition("@")[2]
    host = "".join(c for c in host if c.isprintable() and not c.isspace())[:80]
    shown = f"***@{host}" if "@" in netloc else host
    return f"{scheme[:10]}://{shown}" if sep else shown


def check_endpoint_url(value: str, name: str = ENDPOINT_ENVS[0]) -> str:
    """``value`` if it is a plain ``http(s)://host[:port][/path]`` URL; else ConfigError
    with one line that never echoes credentials (see :func:`redact_url`)."""
    shown = redact_url(value)
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    netloc = value.partition("://")[2].split("/", 1)[0]
    if "@" in netloc or (parts is not None and (parts.username or parts.password)):
        raise ConfigError(
            f"{name} must not contain credentials ({shown}); put keys in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if (
        parts is None
        or not port_ok
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise ConfigError(
            f"{name}: expected an http(s)://host[:port] URL (e.g. http://localhost:9000), got {shown!r}; fix it"
        )
    return value


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (None: AWS's own endpoints), checked by
    :func:`check_endpoint_url` (no credentials inside, a plain http(s) URL)."""
    for name in ENDPOINT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return check_endpoint_url(value, name)
    return None


def s3_client() -> Any:
    """A boto3 S3 client: endpoint and credentials from the environment (see module doc)."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    session = boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": 3, "mode": "standard"},
        # S3-compatible stores (MinIO, moto, Ceph) expect path-style addressing
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    try:
        return session.client("s3", endpoint_url=endpoint, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: <url>" (echoes the URL: not shown)
        shown = redact_url(endpoint or "")
        raise ConfigError(
            f"{ENDPOINT_ENVS[0]}: the S3 client refused the endpoint {shown!r} ({type(exc).__name__})"
        ) from None


def call_s3(action: Callable[[], T], what: str) -> T:
    """Run one S3 call, translating botocore errors into the synthmed error family."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    try:
        return action()
    except NoCredentialsError:
        raise ConfigError(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        ) from None
    except (BotoConnectionError, ConnectionClosedError, ReadTimeoutError) as exc:
        raise TransientError(
            f"{what}: S3 endpoint unreachable ({type(exc).__name__}); retry or check {ENDPOINT_ENVS[0]}"
        ) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in TRANSIENT_CODES or status >= 500:
            raise TransientError(f"{what}: S3 answered {code or status}; worth a retry") from None
        if code == "NoSuchBucket":
            raise DataError(f"{what}: bucket not found; create it or fix the s3:// URI") from None
        if code in CREDENTIAL_CODES:
            raise ConfigError(
                f"{what}: S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and the bucket policy"
            ) from None
        raise SynthmedError(f"{what}: S3 error {code or status}: {error.get('Message', '')}".rstrip(": ")) from None
    except BotoCoreError as exc:
        raise SynthmedError(f"{what}: S3 client error ({type(exc).__name__}); check {ENDPOINT_ENVS[0]}") from None


def list_objects(uri: S3Uri, client: Any | None = None) -> list[dict[str, Any]]:
    """Every object under ``uri`` (as a folder): ``[{"key", "size", "etag"}]`` sorted by key."""
    client = client or s3_client()
    prefix = f"{uri.prefix}/" if uri.prefix else ""
    objects: list[dict[str, Any]] = []

    def pages() -> list[dict[str, Any]]:
        paginator = client.get_paginator("list_objects_v2")
        return list(paginator.paginate(Bucket=uri.bucket, Prefix=prefix))

    for page in call_s3(pages, f"list {uri} (bucket {uri.bucket})"):
        for item in page.get("Contents", []):
            objects.append({"key": item["Key"], "size": int(item["Size"]), "etag": item.get("ETag", "")})
    return sorted(objects, key=lambda o: o["key"])


def _relative_key(key: str, uri: S3Uri) -> PurePosixPath | None:
    """``key`` relative to the prefix, or None for folder markers and unsafe keys."""
    rel = key[len(uri.prefix) + 1 :] if uri.prefix else key
    if not rel or rel.endswith("/"):
        return None
    path = PurePosixPath(rel)
    if path.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        log.warning("skipping an S3 key with an unsafe relative path under %s", uri)
        return None
    return path


def download_prefix(uri: S3Uri, dest: Path, client: Any | None = None) -> int:
    """Mirror every object under ``uri`` into ``dest`` (replaced as a whole, atomically:
    a failed download leaves the previous copy); returns the number of files."""
    client = client or s3_client()
    objects = list_objects(uri, client)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.download-{uuid.uuid4().hex}")
    count = 0
    try:
        for item in objects:
            rel = _relative_key(item["key"], uri)
            if rel is None:
                continue
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            call_s3(
                lambda key=item["key"], target=target: client.download_file(uri.bucket, key, str(target)),
                f"download from {uri}",
            )
            count += 1
        if dest.exists():
            shutil.rmtree(dest)
        if count:
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


def upload_dir(src: Path, uri: S3Uri, client: Any | None = None) -> list[str]:
    """Upload every file under ``src`` to ``uri/<relative path>``; returns the s3:// URIs
    written (sorted). Objects already there under other names are left alone."""
    client = client or s3_client()
    src = Path(src)
    written = []
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src).as_posix()
        key = uri.key(rel)
        call_s3(lambda file=file, key=key: client.upload_file(str(file), uri.bucket, key), f"upload to {uri}")
        written.append(f"s3://{uri.bucket}/{key}")
    return written


# --------------------------------------------------------------------------- pipeline use
def staging_dir(paths: PipelinePaths) -> Path:
    """Where an ``s3`` source is downloaded before ingest (untracked, under ``.synthmed``)."""
    return paths.state / "staging" / "source"


def localize_source(source: Any, paths: PipelinePaths) -> Any:
    """The source ingest should read: an ``s3`` source is downloaded to
    :func:`staging_dir` and returned as the equivalent ``folder`` source (so the rows
    are the same as from a local copy of the prefix); other sources pass through."""
    if getattr(source, "kind", None) != "s3":
        return source
    from tasks.config import FolderSource

    uri = S3Uri.parse(source.uri)
    dest = staging_dir(paths)
    count = download_prefix(uri, dest)
    if count == 0:
        raise DataError(
            f"{uri}: no objects under this prefix; expected <prefix>/<label>/<image files>; "
            "upload the images or fix source.uri"
        )
    log.info("ingest: downloaded %d objects from %s", count, uri)
    return FolderSource(
        kind="folder",
        path=str(dest.resolve()),
        subject_regex=source.subject_regex,
        modality=source.modality,
        anatomy=source.anatomy,
        licence=source.licence,
    )


def results_dirs(paths: PipelinePaths) -> dict[str, Path]:
    """The local folders copied to ``storage.results_uri``: reports and metrics."""
    return {"reports": paths.reports, "metrics": paths.metrics}


def publish_results(cfg: "PipelineConfig", paths: PipelinePaths) -> list[str]:
    """Copy ``reports/<pipeline>/`` and ``metrics/<pipeline>/`` to
    ``<storage.results_uri>/<pipeline>/{reports,metrics}/``; returns the URIs written
    ([] when no ``results_uri`` is configured)."""
    results_uri = cfg.storage.results_uri
    if not results_uri:
        return []
    base = S3Uri.parse(results_uri).child(paths.pipeline)
    client = s3_client()
    written: list[str] = []
    for name, folder in results_dirs(paths).items():
        if not folder.is_dir():
            raise DataError(f"{folder}: nothing to publish; run the pipeline's stages first")
        written += upload_dir(folder, base.child(name), client)
    log.info("published %d result files to %s", len(written), base)
    return written
