"""``image-proxy daemon``: its flags, its defaults, and starting it (bound socket or systemd activation).

Defaults follow where systemd puts things for a service (``$RUNTIME_DIRECTORY``, ``$CACHE_DIRECTORY``) and
the usual places otherwise: ``/run/image-proxy/image-proxy.sock`` and ``/var/cache/image-proxy`` for root,
``$XDG_RUNTIME_DIR/image-proxy/`` and ``$XDG_CACHE_HOME/image-proxy`` (``~/.cache``) for other users.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from proxy.cache.files import make_private_dirs
from proxy.cli.settings import options_from_args
from proxy.commands import arguments
from proxy.config import ConfigError
from proxy.config.daemon_conf import load_daemon_conf, parse_host_port
from proxy.server import logs
from proxy.server.limits import DAEMON_LIMITS, DAEMON_WIDE_LIMITS
from proxy.server.options import ProxyOptions
from proxy.server.peer import AccessPolicy
from proxy.server.session import serve_socket

if TYPE_CHECKING:
    # the daemon's machinery costs about 20 ms at start-up: every spawned proxy would pay it
    from proxy.server.daemon import Daemon, DaemonSettings
    from proxy.server.metrics_http import MetricsExporter

log = logging.getLogger("image-proxy.server.daemon")


DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_METRICS_INTERVAL = 15.0
SOCKET_NAME = "image-proxy.sock"


def _first_dir(variable: str) -> str | None:
    """A systemd directory variable (``CacheDirectory=a b`` gives ``/var/cache/a:/var/cache/b``): the first."""
    value = os.environ.get(variable)
    return value.split(":")[0] if value else None


def default_socket_path() -> str:
    runtime = _first_dir("RUNTIME_DIRECTORY")
    if runtime:
        return str(Path(runtime) / SOCKET_NAME)
    if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
        return str(Path(os.environ["XDG_RUNTIME_DIR"]) / "image-proxy" / SOCKET_NAME)
    return f"/run/image-proxy/{SOCKET_NAME}"


def default_cache_dir() -> str:
    cache = _first_dir("CACHE_DIRECTORY")
    if cache:
        return cache
    if os.geteuid() == 0:
        return "/var/cache/image-proxy"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "image-proxy")


def add_daemon_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="PATH", help=f"the socket to listen on (default {default_socket_path()})")
    parser.add_argument("--socket-group", type=arguments.group, metavar="GROUP", help="group owning the socket")
    parser.add_argument(
        "--socket-mode", type=arguments.octal_mode, metavar="MODE", help="the socket's mode (default 0660)"
    )
    parser.add_argument(
        "--allow-uid",
        type=arguments.user,
        action="append",
        metavar="USER",
        help="serve only these users (repeatable; with --allow-gid: either matches); default: whoever can connect",
    )
    parser.add_argument(
        "--allow-gid", type=arguments.group, action="append", metavar="GROUP", help="serve members of these groups"
    )
    parser.add_argument(
        "--shutdown-grace",
        type=arguments.seconds(zero_allowed=True, what="the grace period"),
        metavar="SECONDS",
        help=f"after SIGTERM, how long transfers in flight may finish (default {DEFAULT_SHUTDOWN_GRACE:g})",
    )
    parser.add_argument("--no-blob-cache", action="store_true", help=f"no blob cache (default: {default_cache_dir()})")
    parser.add_argument(
        "--metrics-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; e.g. 127.0.0.1:9464)",
    )
    parser.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write the metrics to PATH (atomically) for node_exporter's textfile collector (default: off)",
    )
    parser.add_argument(
        "--metrics-textfile-interval",
        type=arguments.seconds(what="the textfile interval"),
        metavar="SECONDS",
        help=f"how often --metrics-textfile is written (default {DEFAULT_METRICS_INTERVAL:g})",
    )


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def daemon_config(args: argparse.Namespace) -> tuple[ProxyOptions, DaemonSettings]:
    """The daemon's options and settings from flags, then the config file, then the defaults. Raises
    ConfigError; called again on SIGHUP."""
    from proxy.server.daemon import DaemonSettings

    conf = load_daemon_conf(args.config)  # once per start or reload
    options = options_from_args(args, DAEMON_LIMITS, conf)
    if args.no_blob_cache or (conf.cache_enabled is False and not args.blob_cache):
        cache_dir = None
    else:
        cache_dir = args.blob_cache or conf.cache_dir or default_cache_dir()
    cache_max = args.blob_cache_max if args.blob_cache_max is not None else conf.cache_max_size
    options = attrs.evolve(options, blob_cache=cache_dir, blob_cache_max=cache_max)

    def pick(flag: object, configured: object, default: object) -> object:
        return flag if flag is not None else configured if configured is not None else default

    uids = frozenset(args.allow_uid) if args.allow_uid else conf.allow_uids or frozenset()
    gids = frozenset(args.allow_gid) if args.allow_gid else conf.allow_gids or frozenset()
    wide = DAEMON_WIDE_LIMITS
    configured = {
        "connections": conf.max_connections,
        "connections_per_uid": conf.max_connections_per_uid,
        "open_images_per_uid": conf.open_images_per_uid,
        "open_pipes_per_uid": conf.open_pipes_per_uid,
        "queued_bytes": conf.daemon_queued_request_bytes,
    }
    wide = attrs.evolve(wide, **{name: value or None for name, value in configured.items() if value is not None})
    settings = DaemonSettings(
        listen=pick(args.listen, conf.listen, default_socket_path()),  # type: ignore[arg-type]
        socket_group=pick(args.socket_group, conf.socket_group, None),  # type: ignore[arg-type]
        socket_mode=pick(args.socket_mode, conf.socket_mode, 0o660),  # type: ignore[arg-type]
        access=AccessPolicy(uids, gids),
        shutdown_grace=pick(args.shutdown_grace, conf.shutdown_grace, DEFAULT_SHUTDOWN_GRACE),  # type: ignore[arg-type]
        limits=wide,
        metrics_listen=pick(args.metrics_listen, conf.metrics_listen, None),  # type: ignore[arg-type]
        metrics_textfile=pick(args.metrics_textfile, conf.metrics_textfile, None),  # type: ignore[arg-type]
        metrics_interval=pick(  # type: ignore[arg-type]
            args.metrics_textfile_interval, conf.metrics_textfile_interval, DEFAULT_METRICS_INTERVAL
        ),
    )
    return options, settings


def run_daemon(args: argparse.Namespace) -> int:
    from proxy.server.daemon import Daemon, DaemonError, activated_socket, bind_listener, is_listening

    logs.setup_logging(logging.DEBUG if args.debug else logging.INFO)
    raise_fd_limit()
    if args.insecure_policy and args.require_signed:
        log.error("--insecure-policy and --require-signed cannot be used together")
        return 2
    try:
        options, settings = daemon_config(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        listener = activated_socket()
        activated = listener is not None
        if listener is None:
            listener = bind_listener(settings)
    except DaemonError as e:
        log.error("%s", e)
        return 1
    if activated:
        settings = attrs.evolve(settings, listen=str(listener.getsockname() or "the activated socket"))
        if not is_listening(listener):
            # Accept=yes: systemd passed one client's connection; serve it as the spawned mode would
            log.info("socket activation passed a connected socket: serving that one client")
            trio.run(serve_socket, listener, options)
            return 0
    options = _usable_cache(options, explicit=options.blob_cache != default_cache_dir())
    if options is None:
        return 1
    bound = None if activated else _inode(settings.listen)
    try:
        daemon = Daemon(listener, options, settings, lambda: daemon_config(args))
        if settings.metrics_listen is not None or settings.metrics_textfile is not None:
            daemon.metrics = _metrics_exporter(settings, daemon)
        trio.run(daemon.serve)
    except DaemonError as e:
        log.error("%s", e)
        return 1
    finally:
        listener.close()
        if bound is not None and _inode(settings.listen) == bound:
            with contextlib.suppress(OSError):
                os.unlink(settings.listen)  # ours, not a newer daemon's
    return 0


def _metrics_exporter(settings: DaemonSettings, daemon: Daemon) -> MetricsExporter:
    """What --metrics-listen and --metrics-textfile ask for (prometheus_client is imported only then); its socket
    is bound now, so that a bad address stops the daemon before it says it is ready."""
    from proxy.server.daemon import DaemonError
    from proxy.server.metrics import STATS
    from proxy.server.metrics_http import MetricsError, MetricsExporter, bind

    try:
        sock = bind(*settings.metrics_listen) if settings.metrics_listen is not None else None
    except MetricsError as e:
        raise DaemonError(str(e)) from None
    return MetricsExporter(STATS, daemon.store, sock, settings.metrics_textfile, settings.metrics_interval)


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard limit, as Go programs (skopeo) do at start: the daemon's
    fd use is bounded by its own limits (proxy/server/limits.py), not by a 1024 default meant for select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.debug("open files limit: %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _usable_cache(options: ProxyOptions, explicit: bool) -> ProxyOptions | None:
    """Check that the cache directory can be made: a configured one that cannot stops the daemon (None), the
    default one that cannot is logged and the daemon runs without a cache."""
    if options.blob_cache is None:
        log.info("blob cache: off")
        return options
    try:
        make_private_dirs(Path(options.blob_cache) / "blobs")
    except OSError as e:
        text = f"blob cache {options.blob_cache}: cannot create it: {e.strerror}"
        if explicit:
            log.error("%s", text)
            return None
        log.warning("%s; running without a cache", text)
        return attrs.evolve(options, blob_cache=None)
    log.info("blob cache: %s", options.blob_cache)
    return options


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


__all__ = ["add_daemon_flags", "daemon_config", "run_daemon"]
