"""Log lines on stderr: one line per record, with its level, readable by people and by journald.

Under systemd (``JOURNAL_STREAM`` set) each line starts with the syslog priority in angle brackets
(``<3>``, ``<4>``, ``<6>``, ``<7>``), which journald turns into the entry's priority and strips, so
``journalctl -p warning`` works. Multi-line messages (tracebacks) are folded into the one line.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


#: control characters a client's text may carry into a log line (terminal escapes, NUL, ...)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def _escape(char: re.Match[str]) -> str:
    return f"\\x{ord(char.group()):02x}"


def printable(text: str) -> str:
    """``text`` safe for one log line on any stream: control characters and lone surrogates (which a client's
    JSON may carry) become backslash escapes."""
    text = _CONTROL.sub(_escape, text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


#: what in a URL may be a credential: its user information (``user:password@``) and its query (a redirect to object
#: storage carries a signature there: ``X-Amz-Signature=``, ``sig=``, ``token=``)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(?i)\b(https?://[^\s?#'\"]*)\?[^\s'\"]*")


def redact(text: str) -> str:
    """``text`` without credentials a URL in it may carry: user information and query strings are replaced by
    ``…``. Log lines never hold a password, a token or a signed URL's signature, whichever error text they quote."""
    if "://" not in text:
        return text
    return _URL_QUERY.sub(r"\1?…", _URL_USERINFO.sub(r"\1…@", text))


class OneLineFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__(
            "%(levelname)s %(name)s: %(message)s"
            if journald
            else "image-proxy[%(process)d] %(levelname)s %(name)s: %(message)s"
        )
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = printable(redact(super().format(record)).replace("\r", "").replace("\n", " | "))
        return f"<{_priority(record.levelno)}>{text}" if self.journald else text


def setup_logging(level: int) -> None:
    """Send records at ``level`` and above to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
