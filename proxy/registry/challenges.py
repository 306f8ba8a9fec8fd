"""``WWW-Authenticate`` challenges and token scopes, pure: an RFC 7235 challenge parser (several challenges per
header, quoted strings with escapes, token68) that tolerates garbage and never raises, and distribution's
``type:name:actions`` scopes."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

# -- challenges ------------------------------------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-case scheme, lower-case parameter names."""

    scheme: str
    params: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: the token68 form (``Negotiate abc==``), rare for registries
    token68: str = ""

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str:
        return self.params.get("service", "")


_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# token68 adds "/" (and trailing "="); accepted in names too, so ``Basic dXNl/cg==`` reads as one word
_WORD_CHARS = _TCHARS | {"/"}
_SPACE = " \t"


class _Cursor:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> bool:
        """Skip any of ``chars``; True if a comma was among the skipped ones."""
        comma = False
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            comma = comma or self.text[self.pos] == ","
            self.pos += 1
        return comma

    def word(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _WORD_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """A quoted string starting at the cursor (on the opening quote); an unterminated one runs to the end."""
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                break
            if char == "\\":
                if self.pos < len(self.text):
                    out.append(self.text[self.pos])
                    self.pos += 1
                continue
            out.append(char)
        return "".join(out)

    def bare_value(self) -> str:
        """An unquoted value: lenient, up to whitespace or a comma (servers send unquoted URLs)."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in " \t,":
            self.pos += 1
        return self.text[start : self.pos]


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Every challenge in one ``WWW-Authenticate`` value. Never raises: what cannot be parsed is skipped.

    The first occurrence of a parameter wins. A parameter before any scheme is dropped."""
    cursor = _Cursor(value)
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    token68 = ""
    fresh = False  # right after the scheme: a lone word is token68

    def finish() -> None:
        if scheme is not None:
            challenges.append(Challenge(scheme, dict(params), token68))

    while True:
        comma = cursor.skip(_SPACE + ",")
        if not cursor.peek():
            break
        word = cursor.word()
        if not word:  # garbage: skip it (a whole quoted string, or one character)
            if cursor.peek() == '"':
                cursor.quoted()
            else:
                cursor.pos += 1
            continue
        cursor.skip(_SPACE)
        if cursor.peek() == "=":
            cursor.pos += 1
            cursor.skip(_SPACE)
            following = cursor.peek()
            if following == '"':
                param_value: str | None = cursor.quoted()
            elif following in ("", ",", "="):
                equals = cursor.pos
                cursor.skip("=")
                if fresh and scheme is not None and not params and not comma:
                    token68 = word + "=" * (cursor.pos - equals + 1)
                    fresh = False
                    continue
                param_value = ""
            else:
                param_value = cursor.bare_value()
            if scheme is not None and param_value is not None:
                params.setdefault(word.lower(), param_value)
            fresh = False
            continue
        if fresh and scheme is not None and not comma:
            token68 = word
            fresh = False
            continue
        finish()
        scheme, params, token68, fresh = word.lower(), {}, "", True
    finish()
    return challenges


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """The challenges of every ``WWW-Authenticate`` field of a response, in order."""
    return [challenge for value in values for challenge in parse_www_authenticate(value)]


@attrs.frozen(order=True)
class Scope:
    """A token scope: ``repository:ns/app:pull`` (``str()`` renders it)."""

    repository: str
    actions: tuple[str, ...] = ("pull",)
    resource_type: str = "repository"

    def __str__(self) -> str:
        return f"{self.resource_type}:{self.repository}:{','.join(self.actions)}"

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """``type:name:actions``; the name may contain ``:`` (a host with a port). None if malformed."""
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name or not actions:
            return None
        return cls(name, tuple(a for a in actions.split(",") if a), kind)

    @classmethod
    def parse_list(cls, text: str) -> list[Scope]:
        """A challenge's ``scope`` parameter: space-separated scopes; malformed ones are skipped."""
        return [scope for scope in (cls.parse(part) for part in text.split()) if scope is not None]


def pull(repository: str) -> Scope:
    return Scope(repository, ("pull",))
