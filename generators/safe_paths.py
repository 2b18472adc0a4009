"""One safe path join for every registry write and every card-relative read.

Card ids, versions, weight file names and medigan model keys come from files a stranger
may have written; joined naively (``registry / card.id``) an id ``/etc/x`` or a version
``../../x`` writes anywhere. :func:`safe_join` refuses them, and refuses symlinks that
lead out of the base folder.
"""

from __future__ import annotations

from pathlib import Path

from generators.errors import ConfigError


def safe_join(base: Path | str, *parts: str, what: str = "path") -> Path:
    """``base / parts...``, resolved, guaranteed to stay inside ``base``: refuses absolute
    parts, ``..``, backslashes, empty parts, and symlinks (anywhere along the way) that lead
    out of ``base``. Every registry write and every read of a card-relative file goes
    through here. Raises ConfigError (one line)."""
    base_resolved = Path(base).resolve()
    for part in parts:
        pieces = str(part).split("/")
        if (
            not str(part)
            or str(part).startswith("/")
            or "\\" in str(part)
            or "\x00" in str(part)
            or any(p in ("", ".", "..") for p in pieces)
        ):
            raise ConfigError(
                f"{what}: {str(part)[:60]!r} is not a plain relative path (no leading '/', '..', '\\\\' or "
                "empty parts); fix the card's id, version or file name"
            )
    target = base_resolved.joinpath(*parts)
    resolved = target.resolve()  # follows any symlink that already exists along the way
    if resolved != base_resolved and base_resolved not in resolved.parents:
        raise ConfigError(
            f"{what}: {'/'.join(parts)[:60]!r} leads outside {base} (a symlink?); refusing to read or write there"
        )
    return resolved
