"""containers-policy.json: where it is, and reading it into a :class:`Policy`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NoReturn

import attrs

from proxy.common import jsonlimits
from proxy.image.gojson import go_quote
from proxy.policy.errors import PolicyFileError
from proxy.policy.requirements import Requirement, parse_requirements
from proxy.policy.scopes import ImageScope, scope_problem

SYSTEM_POLICY_PATH = "/etc/containers/policy.json"
USER_POLICY_FILE = ".config/containers/policy.json"
MAX_POLICY_SIZE = 4 << 20
#: what to do when no policy exists: like skopeo we fail closed (nothing is accepted without a policy), but say how
NO_POLICY_HINT = (
    "pass --policy FILE, or write a containers-policy.json(5) to one of them; the containers-common package "
    "installs /etc/containers/policy.json"
)


@attrs.frozen
class Policy:
    """A parsed policy file: ``default`` and the per-transport scopes."""

    path: str
    default: tuple[Requirement, ...]
    transports: Mapping[str, Mapping[str, tuple[Requirement, ...]]] = attrs.field(factory=dict)

    def requirements_for(self, scope: ImageScope) -> tuple[str, tuple[Requirement, ...]]:
        """The requirements that apply, and the name of the scope they come from (for error texts)."""
        scopes = self.transports.get(scope.transport)
        if scopes is not None:
            for name in (scope.identity, *scope.namespaces):
                if name and name in scopes:
                    return f"transports.{scope.transport}[{json.dumps(name)}]", scopes[name]
            if "" in scopes:
                return f'transports.{scope.transport}[""]', scopes[""]
        return "default", self.default


def default_policy_path(environ: Mapping[str, str] | None = None) -> str:
    """``$HOME/.config/containers/policy.json`` if it exists, else ``/etc/containers/policy.json`` if it
    exists; else the error skopeo gives."""
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")
    user = os.path.join(home, USER_POLICY_FILE)
    if os.path.exists(user):
        return user
    if os.path.exists(SYSTEM_POLICY_PATH):
        return SYSTEM_POLICY_PATH
    raise PolicyFileError(
        f"no policy.json file found at any of the following: {go_quote(user)}, {go_quote(SYSTEM_POLICY_PATH)}"
        f" ({NO_POLICY_HINT})"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_policy(data: bytes, path: str) -> Policy:
    def fail(key: str, why: str) -> NoReturn:
        raise PolicyFileError(f"invalid policy in {go_quote(path)}: {key}: {why}", path)

    try:
        doc = jsonlimits.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:  # NestingError is a ValueError: "JSON nested too deeply ..."
        raise PolicyFileError(f"invalid policy in {go_quote(path)}: {e}", path) from None
    if not isinstance(doc, dict):
        fail("(top level)", "must be a JSON object")
    for key in doc:
        if key not in ("default", "transports"):
            fail(key, "unknown key")
    if "default" not in doc:
        fail("default", "default policy is missing")
    default = parse_requirements(doc["default"], "default", fail)
    transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
    raw_transports = doc.get("transports", {})
    if not isinstance(raw_transports, dict):
        fail("transports", "must be a JSON object")
    for transport, scopes in raw_transports.items():
        where = f"transports.{transport}"
        if not isinstance(scopes, dict):
            fail(where, "must be a JSON object of scopes")
        parsed: dict[str, tuple[Requirement, ...]] = {}
        for scope, requirements in scopes.items():
            key = f"{where}[{json.dumps(scope)}]"
            problem = scope_problem(transport, scope)
            if problem is not None:
                fail(key, f"invalid scope: {problem}")
            parsed[scope] = parse_requirements(requirements, key, fail)
        transports[transport] = parsed
    return Policy(path, default, transports)


def load_policy(path: str) -> Policy:
    """Read and parse ``path``; PolicyFileError naming the file (and the key) when it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_SIZE + 1)
    except OSError as e:
        raise PolicyFileError(f"open {path}: {(e.strerror or str(e)).lower()}", path) from None
    if len(data) > MAX_POLICY_SIZE:
        raise PolicyFileError(f"invalid policy in {go_quote(path)}: larger than {MAX_POLICY_SIZE} bytes", path)
    return parse_policy(data, path)
