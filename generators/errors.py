"""The one error family of synthmed.

Every message says what was expected, what was found and how to fix it, on one line.
Lives in ``generators`` (the lowest layer) so that ``tasks`` and ``flows`` can share it
without breaking the import direction ``flows -> tasks -> generators``.
"""

from __future__ import annotations


class SynthmedError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(SynthmedError):
    """pipelines.yaml, a model card or a CLI option is invalid."""


class DataError(SynthmedError):
    """An input file or dataset is unusable (corrupt, wrong shape, missing labels)."""


class GeneratorError(SynthmedError):
    """A generator cannot be found, loaded, verified or run."""


class IntegrityError(GeneratorError):
    """A file's sha256 does not match the one recorded for it."""


class QualityGateError(SynthmedError):
    """Synthetic data crossed a configured quality bound; outputs are kept for inspection."""


class TransientError(SynthmedError):
    """A network or storage hiccup worth retrying (the only kind Prefect retries)."""


def worker_cannot_see(path: object) -> DataError:
    """The error of a worker process (e.g. on a Dask cluster) to which ``path``, written or
    announced by the run's driver, does not exist: the project is not on shared storage."""
    import socket

    return DataError(
        f"worker {socket.gethostname()} cannot see the project's storage: {path} does not exist there; "
        "every Dask worker needs the project directory at the same path (a shared filesystem such as "
        "NFS or Lustre, or one ReadWriteMany volume on Kubernetes; S3 is not supported for shards)"
    )
