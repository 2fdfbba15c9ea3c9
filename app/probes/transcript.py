"""The evidence of a check: every line sent and received, with its time, escaped and bounded."""

from __future__ import annotations

import time

from app.verdicts import TranscriptLine, escape_bytes

MAX_TRANSCRIPT_BYTES = 64 * 1024


class Transcript:
    """Lines with times relative to `started`; at most MAX_TRANSCRIPT_BYTES of text, then one marker line."""

    def __init__(self, started: float | None = None, limit: int = MAX_TRANSCRIPT_BYTES) -> None:
        self.started = time.monotonic() if started is None else started
        self.limit = limit
        self.lines: list[TranscriptLine] = []
        self._size = 0
        self._truncated = False

    def add(self, direction: str, data: bytes | str) -> None:
        text = escape_bytes(data) if isinstance(data, bytes) else data
        if self._truncated:
            return
        if self._size + len(text) > self.limit:
            self._truncated = True
            self.lines.append(TranscriptLine(self._now(), "info", "[transcript cut: over 64 KiB]"))
            return
        self._size += len(text)
        self.lines.append(TranscriptLine(self._now(), direction, text))

    def info(self, text: str) -> None:
        self.add("info", text)

    def fork(self) -> "Transcript":
        """A copy that shares the lines so far (a session's greeting) and grows on its own."""
        copy = Transcript(self.started, self.limit)
        copy.lines = list(self.lines)
        copy._size = self._size
        copy._truncated = self._truncated
        return copy

    def _now(self) -> float:
        return round(time.monotonic() - self.started, 3)
