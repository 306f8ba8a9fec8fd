"""The image proxy wire protocol (skopeo experimental-image-proxy, 0.2.8), sans I/O.

Nothing in this package opens a socket or imports trio, except ``protocol.client``,
the client bindings built on top of the codec. The codec (``protocol.codec``), the messages
(``protocol.messages``) and the errors (``protocol.errors``) are imported from their modules: this package
itself imports nothing, so a process that only passes packets on (``proxy.server.relay``) stays lean.
"""

#: the protocol version Initialize answers
PROTOCOL_VERSION = "0.2.8"
#: the largest packet either side sends or accepts (bytes)
MAX_MSG_SIZE = 32 * 1024

__all__ = ["MAX_MSG_SIZE", "PROTOCOL_VERSION"]
