"""The evidence of a check: every line sent and received, with its time, escaped and bounded."""

from __future__ import annotations

import secrets
import time

from app.verdicts import Opening, TranscriptLine, escape_bytes

MAX_TRANSCRIPT_BYTES = 64 * 1024


class Transcript:
    """Lines with times relative to `started`; at most MAX_TRANSCRIPT_BYTES of text, then one marker line."""

    def __init__(self, started: float | None = None, limit: int = MAX_TRANSCRIPT_BYTES) -> None:
        self.started = time.monotonic() if started is None else started
        self.limit = limit
        self.lines: list[TranscriptLine] = []
        self._size = 0
        self._truncated = False
        self.opening: Opening | None = None  # the first lines, shared with other transcripts (see fork)
        self._shared: Opening | None = None  # what this transcript's forks share, while it has not grown

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

    def fork(self) -> Transcript:
        """A copy that shares the lines so far (a session's greeting) and grows on its own.

        The shared lines become the copy's `opening`, one object for every fork of the same lines, so that the
        store keeps them once and the rows of a session reference them. A fork of a fork keeps the first opening
        (the lines after it are that check's own and are copied)."""
        copy = Transcript(self.started, self.limit)
        copy.lines = list(self.lines)
        copy._size = self._size
        copy._truncated = self._truncated
        if self.opening is not None:
            copy.opening = self.opening
        elif self.lines:
            if self._shared is None or len(self._shared.lines) != len(self.lines):
                self._shared = Opening(secrets.token_hex(8), self.lines)
            copy.opening = self._shared
        return copy

    def _now(self) -> float:
        return round(time.monotonic() - self.started, 3)
