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
