"""``SetSessionSettings`` (extension ``session-settings``): the settings one connection brings with it, checked.

A relay (``image-proxy experimental-image-proxy`` spawned by an update agent with ``[spawned] daemon``) forwards the
agent's credential flags and user agent to the daemon, which applies them to that connection only. Pure: the
value is checked here; what the daemon makes of it is ``proxy.server.handler``'s (docs/PROTOCOL.md).
"""

from __future__ import annotations

from typing import Any

import attrs

from protocol.codec import json_type_name, shown
from protocol.errors import ProtocolViolation

#: the strings a settings object may carry, each what the skopeo flag of the same name gives
STRING_KEYS = ("auth_file", "auth_file_name", "creds", "username", "password", "registry_token", "user_agent_prefix")
#: the booleans
BOOLEAN_KEYS = ("no_creds",)
#: the strings that may hold no control character (line breaks included)
_PRINTABLE_KEYS = frozenset({"user_agent_prefix", "registry_token", "auth_file_name"})
#: the strings sent as HTTP header values as they are
_HEADER_KEYS = frozenset({"user_agent_prefix", "registry_token"})
#: the keys that give this connection credentials of its own (instead of the daemon's)
CREDENTIAL_KEYS = ("auth_file", "creds", "username", "password", "registry_token", "no_creds")


@attrs.frozen(repr=False)
class SessionSettings:
    """``auth_file``: the content of the client's ``--authfile`` (``""``: it named a file that does not exist, which
    holds no credentials, as for skopeo); ``auth_file_name``: its name, for error texts. The others are the skopeo
    flags of the same names. Never printed with its secrets."""

    auth_file: str | None = None
    auth_file_name: str | None = None
    creds: str | None = None
    username: str | None = None
    password: str | None = None
    registry_token: str | None = None
    no_creds: bool = False
    user_agent_prefix: str | None = None

    @property
    def own_credentials(self) -> bool:
        """True when the connection brings credentials (or ``no_creds``): the daemon's are not used for it."""
        return any(getattr(self, key) not in (None, False) for key in CREDENTIAL_KEYS)

    def credential_fields(self) -> dict[str, Any]:
        """The credential settings (and the auth file's name), by name, as ``CredentialSource.of_client`` takes them."""
        return {key: getattr(self, key) for key in (*CREDENTIAL_KEYS, "auth_file_name")}

    def __repr__(self) -> str:
        given = [key for key in (*STRING_KEYS, *BOOLEAN_KEYS) if getattr(self, key) not in (None, False)]
        return f"SessionSettings({', '.join(given)})"

    __str__ = __repr__


#: methods whose arguments carry secrets: log lines show :func:`redacted` arguments for them
SECRET_METHODS = frozenset({"SetSessionSettings"})


def redacted(args: Any) -> str:
    """Arguments that may hold secrets, for a log line: the keys of each settings object, no value."""
    if not isinstance(args, list):
        return f"<{json_type_name(args)}>"
    shown_args = []
    for arg in args:
        if isinstance(arg, dict):
            shown_args.append("{" + ", ".join(shown(key, 40) for key in list(arg)[:20]) + "}")
        else:
            shown_args.append(f"<{json_type_name(arg)}>")
    return "[" + ", ".join(shown_args) + "]"


def parse_session_settings(value: Any) -> SessionSettings:
    """The settings object of a ``SetSessionSettings`` request; ProtocolViolation naming the key that is wrong."""
    if not isinstance(value, dict):
        raise ProtocolViolation(f"expecting a settings object, not {json_type_name(value)}")
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if key in STRING_KEYS:
            if not isinstance(item, str):
                raise ProtocolViolation(f"session setting {key}: expecting a string, not {json_type_name(item)}")
            if "\x00" in item:
                raise ProtocolViolation(f"session setting {key}: contains a NUL character")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolViolation(f"session setting {key}: not valid Unicode (a lone surrogate)") from None
            if key in _PRINTABLE_KEYS and not item.isprintable():
                # sent as a header (a token, the user agent) or written into log lines (the file's name)
                raise ProtocolViolation(f"session setting {key}: contains control characters")
            if key in _HEADER_KEYS and not item.isascii():
                raise ProtocolViolation(f"session setting {key}: not ASCII (it is sent as an HTTP header)")
        elif key in BOOLEAN_KEYS:
            if not isinstance(item, bool):
                raise ProtocolViolation(f"session setting {key}: expecting a boolean, not {json_type_name(item)}")
        else:
            known = ", ".join((*STRING_KEYS, *BOOLEAN_KEYS))
            raise ProtocolViolation(f"unknown session setting {shown(key, 100)} (known: {known})")
        fields[key] = item
    return SessionSettings(**fields)


__all__ = [
    "BOOLEAN_KEYS",
    "CREDENTIAL_KEYS",
    "SECRET_METHODS",
    "STRING_KEYS",
    "SessionSettings",
    "parse_session_settings",
    "redacted",
]
