"""The one exception type the CLI turns into a single clear line (no traceback).

Raise `AblateError` (or a subclass) for anything the *user* can fix: a bad path, malformed JSON,
an unknown config key, a wrong type. Bugs stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

import re


class AblateError(Exception):
    """A user-facing error; its message names the file or field at fault."""


class ConfigError(AblateError):
    """An unknown key, a value of the wrong type, or an invalid experiment file."""


class DataError(AblateError):
    """A missing data folder, malformed annotations, or an unreadable image."""


def one_line(error: BaseException) -> str:
    """The user-facing line of `error`.

    A DataLoader worker re-raises our exception with the worker's whole traceback folded into the
    message; the line we raised is then its last line, after the exception's qualified name.
    """
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1].strip()
    for cls in (AblateError, ConfigError, DataError):
        prefix = f"{cls.__module__}.{cls.__name__}: "
        if last.startswith(prefix):
            return printable(last[len(prefix):])
    return printable(last)


# C0 and C1 control characters but tab: an escape sequence in a name or value would be run by the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
MAX_MESSAGE = 600  # characters of a message shown; a 5 MB value quoted whole buried the line


def printable(text: str) -> str:
    """`text` safe to print as one line: control characters (escape sequences) shown as \\x1b,
    undecodable bytes of a file name (lone surrogates) as \\udcXX, and a text longer than
    MAX_MESSAGE cut in the middle, where a quoted value usually sits, keeping the start (file, key)
    and the end."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if len(text) > MAX_MESSAGE:
        head, tail = MAX_MESSAGE * 3 // 4, MAX_MESSAGE // 4
        text = f"{text[:head]} [... {len(text) - head - tail:,} characters cut ...] {text[-tail:]}"
    return text


def mask_url(url: str) -> str:
    """`url` with the password of its user part replaced by ***: 'postgresql://me:pw@host/db' ->
    'postgresql://me:***@host/db'. Every URL the tool prints or logs goes through this."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


# scheme://user:password@ anywhere in a text: the password part is what must never be shown.
_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+):[^\s@/]+@")


def mask_urls(text: str) -> str:
    """`text` with the password of every URL in it replaced by *** (see `mask_url`): for messages
    and log lines that quote URLs among other words."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def check_at_least(value: int | None, minimum: int, option: str) -> None:
    """An option's count of something (--jobs, --gpus-per-cell, --checkpoint-every): one
    AblateError naming it when below `minimum`; None (not given) passes."""
    if value is not None and value < minimum:
        raise AblateError(f"{option}: must be >= {minimum}, got {value}")
