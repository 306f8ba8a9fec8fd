"""The image proxy wire protocol (skopeo experimental-image-proxy, 0.2.8), sans I/O.

Nothing in this package opens a socket or imports trio, except ``protocol.client``,
the client bindings built on top of the codec.
"""

from protocol.codec import MAX_MSG_SIZE, decode_reply, decode_request, encode_reply, encode_request
from protocol.errors import ErrorCode, ProxyError
from protocol.messages import Reply, Request

PROTOCOL_VERSION = "0.2.8"

__all__ = [
    "MAX_MSG_SIZE",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "ProxyError",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]
