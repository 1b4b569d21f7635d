"""Log lines a stranger can cause: values they control are escaped, repeats are rate-limited.

A caller controls its caller ID name and the SIP headers that reach ``variable_*``; whoever can
reach a port controls how often a refused or silent connection happens. Neither may forge a log
line (a newline or another control character in a value would start one) or flood the log.
"""

from __future__ import annotations

import logging
import re
import time

# C0 and C1 controls, DEL, the Unicode line and paragraph separators and the bidirectional
# overrides (which make a log viewer show text in another order than it was written).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\\\]")
MAX_LOGGED = 200   # characters of one value; the rest is cut, with a mark


def _escape(match: re.Match) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(value, limit: int = MAX_LOGGED) -> str:
    """``value`` as one line of plain text, safe to put in a log line: controls escaped
    (``\\x0a``), a backslash doubled (so an escape cannot be faked), cut after ``limit``
    characters. Values are taken as they are: a header value is url-decoded once, by the
    parser, and never again here."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    text = _UNSAFE.sub(_escape, text)
    return f"{text}...(cut)" if cut else text


class RateLimitedLog:
    """At most one log line per ``interval`` seconds for one kind of event a peer can repeat
    at will; each line says how many were left out since the one before."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger, self.interval = logger, interval
        self._logged_at = float("-inf")
        self._left_out = 0

    def __call__(self, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._logged_at < self.interval:
            self._left_out += 1
            return
        self.logger.log(level, message + " (%d more since the last report)", *args,
                        self._left_out)
        self._logged_at, self._left_out = now, 0
