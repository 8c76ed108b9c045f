"""Data-dir resolution and strict line-oriented readers that name the file and line on bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def data_dirs(configured: str | os.PathLike | None) -> list[Path]:
    """Directories searched for local data, in order: the configured dir, then $TALKLORA_DATA_DIR."""
    dirs: list[Path] = []
    for name, d in (("paths.data_dir", configured), ("TALKLORA_DATA_DIR", os.environ.get("TALKLORA_DATA_DIR"))):
        if not d:
            continue
        p = Path(d).expanduser().resolve()
        if p.exists() and not p.is_dir():
            raise UserError(f"{name}={d}: {p} is a file, not a directory; point it at the folder holding the data")
        if p not in dirs:
            dirs.append(p)
    return dirs


def find_local(configured: str | None, *rel: str) -> Path | None:
    """First `<data_dir>/<rel...>` that exists, else None."""
    for d in data_dirs(configured):
        p = d.joinpath(*rel)
        if p.exists():
            return p
    return None


def describe_search(configured: str | None, *rel: str) -> str:
    dirs = data_dirs(configured)
    where = ", ".join(str(d.joinpath(*rel)) for d in dirs) or "(no data dir configured)"
    return f"searched {where} (set TALKLORA_DATA_DIR or paths.data_dir; TALKLORA_DATA_DIR={os.environ.get('TALKLORA_DATA_DIR', '<unset>')})"


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) with a clear error on non-UTF-8 bytes; strips a UTF-8 BOM."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start}); files must be UTF-8"
                ) from None
            if i == 1:
                text = text.lstrip("\ufeff")
            yield i, text.rstrip("\r\n")
