"""Header lists: what callers pass in, and what responses hand out (case-insensitive lookup)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

#: request headers as a caller gives them: a mapping, or (name, value) pairs when a name repeats
HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]


def header_pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    """``headers`` as a list of (name, value) pairs, in order."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), str(value)) for name, value in items]


def without(headers: Iterable[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    """``headers`` minus every field called one of ``names`` (any case)."""
    drop = {name.lower() for name in names}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def has(headers: Iterable[tuple[str, str]], name: str) -> bool:
    lowered = name.lower()
    return any(n.lower() == lowered for n, _ in headers)


class Headers:
    """Response headers: ordered (name, value) pairs, names lower-cased, values decoded as latin-1."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = [(name.lower(), value) for name, value in items]

    @classmethod
    def from_h11(cls, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        return cls((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (any case), or ``default``."""
        lowered = name.lower()
        for n, value in self._items:
            if n == lowered:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order (for headers that may repeat, like WWW-Authenticate)."""
        lowered = name.lower()
        return [value for n, value in self._items if n == lowered]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"
