"""Keyed pseudonyms for subject ids: ``sub-`` + 12 hex chars of HMAC-SHA256.

The key comes from the environment variable ``SYNTHMED_PSEUDONYM_KEY``. When it is not
set, a fixed, public default key (:data:`DEFAULT_KEY`) is used so that ``dvc repro`` in a
fresh clone gives byte-identical datasets; a warning is logged once per process. The
default key is published in this file, so it hides nothing from anyone who can guess
the raw ids: set the environment variable (and keep it out of git) for real patient data.

The same subject and key always give the same pseudonym; without the key the mapping
cannot be inverted or recomputed.

File paths are pseudonymised the same way (:func:`pseudonymise_path`): every component
below the source root (class folders excepted: they are labels) becomes 12 hex chars of
HMAC-SHA256 over ``"path\0" + name``, keeping a known image suffix, so names such as
``DOE_JANE_MRN4471234_19620314/SMITH_JOHN_20240101.dcm`` never reach an output or a log.
:func:`key_id` is a keyed digest that names the key (never the key itself); it is part
of the ingest fingerprint and the dataset manifest, so changing the key reruns ingest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from typing import Literal

from generators.errors import DataError

logger = logging.getLogger(__name__)

KEY_ENV = "SYNTHMED_PSEUDONYM_KEY"
DEFAULT_KEY = b"synthmed-public-default-pseudonym-key-v1"  # public: not a secret
PREFIX = "sub-"
HEX_CHARS = 12
KEY_ID_CHARS = 16
KEY_ID_MESSAGE = b"synthmed-key-id"
PATH_DOMAIN = b"path\x00"
KEPT_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".csv")

_warned = False
_warn_lock = threading.Lock()


def key_source() -> Literal["env", "default"]:
    """Where the key comes from: ``"env"`` when ``SYNTHMED_PSEUDONYM_KEY`` is set and non-empty."""
    return "env" if os.environ.get(KEY_ENV) else "default"


def _key() -> bytes:
    value = os.environ.get(KEY_ENV)
    if value:
        return value.encode("utf-8")
    global _warned
    with _warn_lock:
        if not _warned:
            _warned = True
            logger.warning(
                "%s is not set: subject ids are pseudonymised with the public default key; "
                "set %s to a secret value for real patient data",
                KEY_ENV,
                KEY_ENV,
            )
    return DEFAULT_KEY


def warn_if_default_key(source_kind: str) -> bool:
    """Log one loud warning line when real (non-demo) data is about to be pseudonymised
    with the public default key; returns whether it warned."""
    if key_source() == "env":
        return False
    logger.warning(
        "UNSAFE: %s is not set, so subject ids and file names of this %s source are hashed with the "
        "PUBLIC default key and can be reversed by guessing; export %s=<a long secret> and rerun ingest",
        KEY_ENV,
        source_kind,
        KEY_ENV,
    )
    return True


def key_id() -> str:
    """16 hex chars of HMAC-SHA256(key, ``"synthmed-key-id"``): names the key in the
    ingest fingerprint and manifest without revealing it (equal ids = equal keys)."""
    return hmac.new(_key(), KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:KEY_ID_CHARS]


def pseudonymise_name(name: str) -> str:
    """One path component -> 12 hex chars of HMAC-SHA256(key, ``"path\\0" + name``), plus
    the name's suffix when it is a known image suffix (lowercased): ``SMITH_1.DCM`` ->
    ``"3fa2...e1.dcm"``. Any other suffix is hashed with the name (it may hold a date)."""
    lower = name.lower()
    suffix = next((s for s in KEPT_SUFFIXES if lower.endswith(s) and len(lower) > len(s)), "")
    digest = hmac.new(_key(), PATH_DOMAIN + name.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return digest[:HEX_CHARS] + suffix


def pseudonymise_path(rel: str, keep: int = 0) -> str:
    """A posix path relative to a source root with every component but the first
    ``keep`` (class folders, which are labels) replaced by :func:`pseudonymise_name`;
    a ``#...`` fragment (``#slice=012``) is kept: ``disc/PAT-1/a.dcm#slice=003`` ->
    ``disc/<12 hex>/<12 hex>.dcm#slice=003``."""
    path, hash_mark, fragment = rel.partition("#slice=")
    parts = [p for p in path.split("/") if p]
    shown = parts[:keep] + [pseudonymise_name(p) for p in parts[keep:]]
    return "/".join(shown) + (hash_mark + fragment if hash_mark else "")


def pseudonymise(subject: str) -> str:
    """Map a raw subject id to ``"sub-" + 12 lowercase hex chars`` (HMAC-SHA256, keyed).

    Leading/trailing whitespace is ignored, so ``" P01"`` and ``"P01"`` are one subject.
    Raises :class:`DataError` for an empty id.
    """
    text = subject.strip()
    if not text:
        raise DataError("expected a non-empty subject id, got an empty one; fill in the subject")
    digest = hmac.new(_key(), text.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_CHARS]


class Redactor:
    """Replaces whole-token occurrences of known raw subject ids in a text (a file path)
    by their pseudonyms. A token is delimited by the text's ends or by characters other
    than letters and digits, so with ``PAT-7`` known, ``"PAT-7/PAT-7_t1.dcm"`` becomes
    ``"sub-.../sub-..._t1.dcm"`` while ``"PAT-77"`` is left alone; longer ids win.

    Thread-safe. The raw ids stay inside: ``repr`` shows only how many there are.
    """

    def __init__(self, *subjects: str) -> None:
        self._raw: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        for subject in subjects:
            self.add(subject)

    def add(self, subject: str) -> None:
        raw = subject.strip()
        if raw:
            with self._lock:
                if raw not in self._raw:
                    self._raw.add(raw)
                    self._pattern = None

    def update(self, other: "Redactor") -> None:
        with other._lock:
            raws = set(other._raw)
        for raw in raws:
            self.add(raw)

    def __call__(self, text: str) -> str:
        with self._lock:
            if not self._raw:
                return text
            if self._pattern is None:
                options = "|".join(re.escape(r) for r in sorted(self._raw, key=lambda r: (-len(r), r)))
                self._pattern = re.compile(rf"(?<![^\W_])(?:{options})(?![^\W_])")
            pattern = self._pattern
        return pattern.sub(lambda match: pseudonymise(match.group(0)), text)

    def __repr__(self) -> str:
        return f"Redactor({len(self._raw)} ids)"


def redact(text: str, subject: str) -> str:
    """``text`` with the raw ``subject`` id replaced by its pseudonym (see :class:`Redactor`)."""
    return Redactor(subject)(text)
