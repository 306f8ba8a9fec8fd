"""The client side of the protocol, with I/O: ``ImageProxy`` (trio; spawns a proxy or connects to a daemon),
``sync.SyncImageProxy`` (for scripts), ``pull`` (a whole image, concurrently, verified), and the helpers both ends
use: fd passing (``fds``) and task groups that raise their first failure (``tasks``)."""

from protocol.client.image_proxy import DEFAULT_ARGV, REQUEST_IDS, ImageProxy, ProxyClosed, parse_version

__all__ = ["DEFAULT_ARGV", "REQUEST_IDS", "ImageProxy", "ProxyClosed", "parse_version"]
