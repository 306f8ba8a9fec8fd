"""What the fuzz targets share: starting atheris with this directory's defaults, and JSON values made from a
FuzzedDataProvider.

Only the standard library and atheris are imported here: a target imports the code it fuzzes itself, inside
``atheris.instrument_imports()``, and a module imported earlier would not be instrumented.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))


def corpus_dir(target: str) -> str:
    return os.path.join(HERE, "corpus", target)


def run(target: str, test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Fuzz ``test_one_input`` with libFuzzer flags from ``argv`` (default: ``sys.argv``); the target's token
    dictionary (dicts/<target>.dict) is added unless a ``-dict=`` is given."""
    argv = list(sys.argv if argv is None else argv)
    dictionary = os.path.join(HERE, "dicts", f"{target}.dict")
    if os.path.exists(dictionary) and not any(a.startswith("-dict=") for a in argv[1:]):
        argv.insert(1, f"-dict={dictionary}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


_STRINGS = ("", "a", "sha256:", "oci:", "[", "{", '"', "\\", "\udcff", "\ud800", "\x00", "\u2028", "é", "😀")


def json_string(fdp: atheris.FuzzedDataProvider, max_len: int = 40) -> str:
    """Any string a JSON text can carry, lone surrogates included."""
    if fdp.ConsumeBool():
        return fdp.PickValueInList(list(_STRINGS))
    return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, max_len))


def json_number(fdp: atheris.FuzzedDataProvider) -> int | float:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        return fdp.ConsumeIntInRange(-2, 10)
    if kind == 1:
        return fdp.PickValueInList([2**53 - 1, 2**53, 2**63, -(2**63) - 1, 2**64, 10**30, 1 << 30, (1 << 30) + 1])
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 12))
    if kind == 3:
        return fdp.PickValueInList([0.0, -0.0, 1.0, 1.5, 1e300, 7.0, 2.0**53])
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    return fdp.ConsumeIntInRange(0, 1 << 20)


def json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON value of any type, nested at most a few levels."""
    kind = fdp.ConsumeIntInRange(0, 6 if depth < 4 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return json_number(fdp)
    if kind in (3, 4):
        return json_string(fdp)
    if kind == 5:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {json_string(fdp, 10): json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
