"""Following the log files of ``shoal up``'s children, like ``tail -f`` on several.

Files are read from a remembered offset each time ``read_new`` is called; polling
is how ``tail -f`` itself works where inotify is not at hand, and log files here
are few and small.
"""

from __future__ import annotations

from pathlib import Path

from shoal.supervisor import read_tail


class LogFollower:
    """New complete lines of a set of named files since the last call."""

    def __init__(self, files: dict[str, Path], from_start: bool = False) -> None:
        self._files = files
        self._offsets = {name: 0 if from_start else _size(path) for name, path in files.items()}
        self._partial: dict[str, bytes] = {}

    def read_new(self) -> list[tuple[str, str]]:
        lines: list[tuple[str, str]] = []
        for name, path in self._files.items():
            lines.extend((name, line) for line in self._read(name, path))
        return lines

    def _read(self, name: str, path: Path) -> list[str]:
        size = _size(path)
        offset = self._offsets[name]
        if size < offset:  # truncated or replaced: start over
            offset = 0
        if size == offset:
            return []
        with path.open("rb") as f:
            f.seek(offset)
            data = self._partial.pop(name, b"") + f.read(size - offset)
        self._offsets[name] = size
        *complete, rest = data.split(b"\n")
        if rest:
            self._partial[name] = rest  # a line still being written
        return [line.decode(errors="replace") for line in complete]


def last_lines(files: dict[str, Path], lines: int) -> list[tuple[str, str]]:
    """The last ``lines`` lines of each file, file by file."""
    return [(name, line) for name, path in files.items() for line in read_tail(path, lines)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
