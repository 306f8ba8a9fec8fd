"""The ``image-proxy`` command line.

``image-proxy experimental-image-proxy`` (alias ``serve``) takes every flag that
``skopeo experimental-image-proxy`` takes, before or after the subcommand, so a client's
``skopeo_cmd`` can point here unchanged. Flags that have no effect yet are accepted and say so
under ``--debug``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from protocol import PROTOCOL_VERSION
from proxy import __version__
from proxy.commands import arguments
from proxy.commands.proxy_flags import TLS_VERIFY
from proxy.config.errors import ConfigError
from proxy.config.settings_file import DEFAULT_PATH as DEFAULT_DAEMON_CONF
from proxy.config.settings_file import relay_socket
from proxy.server import logs

# What serving needs (trio, the session, the settings: ~100 ms of imports) is imported where it is used: a spawned
# proxy that relays to the daemon ([spawned] daemon) imports none of it.
if TYPE_CHECKING:
    from proxy.commands.proxy_access import ServeOne
    from proxy.config.daemon_conf import DaemonConfig
    from proxy.server.options import ProxyOptions

log = logging.getLogger("image-proxy")

SERVE_COMMANDS = ("experimental-image-proxy", "serve")
VERSION_LINE = f"image-proxy version {__version__} (protocol {PROTOCOL_VERSION})"
#: commands that are clients of a proxy (they start one, or use --proxy-socket)
CLIENT_COMMANDS = ("inspect", "layers", "copy")

#: flags skopeo accepts that change nothing here yet, with what will give them meaning
_NOT_YET_EFFECTIVE = {
    "tls_details": "registry TLS (docker:// transport)",
    "daemon_host": "the docker-daemon: transport, which image-proxy does not offer",
    "command_timeout": "nothing: skopeo's proxy ignores it too",
}


def _add_global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """skopeo's persistent flags, valid before or after the subcommand. ``suppress``: a subcommand's copy, accepted
    there but not listed in its help (its own flags come first; ``image-proxy --help`` lists these once)."""
    d = {"default": argparse.SUPPRESS} if suppress else {}

    def add(*names: str, **kwargs: Any) -> None:
        if suppress:
            kwargs["help"] = argparse.SUPPRESS
        parser.add_argument(*names, **kwargs, **d)

    add("--debug", action="store_true", help="log every request and reply (and more) to stderr")
    add(
        "--policy",
        metavar="FILE",
        help="signature policy file (default ~/.config/containers/policy.json, else /etc/containers/policy.json)",
    )
    add("--insecure-policy", action="store_true", help="accept any image, whatever the policy says")
    add("--require-signed", action="store_true", help="refuse an image the policy accepts without a signature")
    add(
        "--registries.d",
        dest="registries_d",
        metavar="DIR",
        help="where signature lookaside settings are (default /etc/containers/registries.d)",
    )
    add("--registries-conf", metavar="FILE", help="registries.conf to use instead of the system's")
    add("--override-arch", metavar="ARCH", help="use ARCH instead of the host's when choosing an image")
    add("--override-os", metavar="OS", help="use OS instead of the host's when choosing an image")
    add("--override-variant", metavar="VARIANT", help="use VARIANT for the architecture when choosing an image")
    add(
        "--tmpdir",
        metavar="DIR",
        help="directory for temporary files (default $TMPDIR; archives are read in place, never unpacked)",
    )
    add("--user-agent-prefix", metavar="PREFIX", help="put PREFIX before the User-Agent sent to registries")
    add("--tls-details", metavar="FILE", help="accepted for skopeo compatibility; no effect yet")
    add(
        "--command-timeout",
        metavar="DURATION",
        help="accepted for skopeo compatibility; no effect (as in skopeo's proxy)",
    )


def _add_serve_flags(parser: argparse.ArgumentParser, connected: bool = True) -> None:
    """The flags of the serving commands; ``connected``: one client on a connected socket (``--sockfd``)."""
    if connected:
        parser.add_argument("--sockfd", type=int, default=0, help="the connected socket's fd (default 0, stdin)")
    parser.add_argument(
        "--authfile",
        default=os.environ.get("REGISTRY_AUTH_FILE"),
        metavar="PATH",
        help="registry credentials file, as skopeo/podman login write it (default $REGISTRY_AUTH_FILE, else the "
        "containers-auth.json(5) search path)",
    )
    parser.add_argument("--creds", metavar="USERNAME[:PASSWORD]", help="credentials for every registry")
    parser.add_argument("--username", help="user name for every registry (with --password)")
    parser.add_argument("--password", help="password for every registry (with --username)")
    parser.add_argument("--registry-token", metavar="TOKEN", help="bearer token for every registry")
    parser.add_argument("--cert-dir", metavar="PATH", help="CA certificates and client keys (*.crt, *.cert, *.key)")
    parser.add_argument(
        "--tls-verify",
        type=arguments.boolean,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="require HTTPS and verified certificates (default true; false also allows plain HTTP)",
    )
    parser.add_argument("--no-creds", action="store_true", help="access the registry anonymously")
    parser.add_argument("--shared-blob-dir", metavar="DIR", help="blobs of oci: layouts live here")
    parser.add_argument("--daemon-host", metavar="HOST", help="accepted for skopeo compatibility; no docker-daemon:")
    parser.add_argument("--blob-cache", metavar="DIR", help="keep verified registry blobs in DIR (default: none)")
    parser.add_argument(
        "--blob-cache-max",
        type=arguments.byte_size,
        metavar="SIZE",
        help="evict least recently used blobs above SIZE (20G)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"the daemon's own settings (TOML; default {DEFAULT_DAEMON_CONF}, if it exists); flags win over it",
    )
    # Our own (skopeo has no such flags): the deadlines of every registry exchange, in seconds.
    parser.add_argument(
        "--connect-timeout",
        type=arguments.seconds(),
        default=None,
        metavar="SECONDS",
        help="DNS + TCP connect (and proxy CONNECT) deadline (default 30)",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        type=arguments.seconds(),
        default=None,
        metavar="SECONDS",
        help="TLS handshake deadline (default 10)",
    )
    parser.add_argument(
        "--response-header-timeout",
        type=arguments.seconds(),
        default=None,
        metavar="SECONDS",
        help="deadline from sending a request to the end of the response headers (default 30)",
    )
    parser.add_argument(
        "--max-resumes",
        type=arguments.whole_number(),
        default=None,
        metavar="N",
        help="how many times one blob transfer may resume after a network failure (default 10)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=arguments.seconds(),
        default=None,
        metavar="SECONDS",
        help="a body read that gets no byte for this long fails (default 30)",
    )


def build_parser(serving_only: bool = False) -> argparse.ArgumentParser:
    """The command line; ``serving_only``: only the serving commands, whose start-up every spawned proxy pays (the
    client commands' modules, about 10 ms of imports, are then not loaded)."""
    parser = argparse.ArgumentParser(
        prog="image-proxy",
        description="A stall-proof, verifying drop-in for skopeo experimental-image-proxy.",
        epilog="The global options may also come after the command. 'image-proxy COMMAND --help' shows a command's "
        "own options and examples.",
    )
    parser.add_argument("--version", action="version", version=VERSION_LINE)
    _add_global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("version", help="print the version of image-proxy and of the protocol it speaks")
    for name in SERVE_COMMANDS:
        p = sub.add_parser(name, help="serve one client on a connected SOCK_SEQPACKET socket")
        _add_global_flags(p, suppress=True)
        _add_serve_flags(p)
    if serving_only:
        return parser
    from proxy.cli.daemon_command import add_daemon_flags
    from proxy.commands.cache import add_cache_parser
    from proxy.commands.copy import add_copy_parser
    from proxy.commands.inspect import add_inspect_parser, add_layers_parser

    p = sub.add_parser("daemon", help="serve many clients on a listening socket (a system service)")
    _add_global_flags(p, suppress=True)
    _add_serve_flags(p, connected=False)
    add_daemon_flags(p)
    add_inspect_parser(sub, _add_global_flags)
    add_layers_parser(sub, _add_global_flags)
    add_copy_parser(sub, _add_global_flags)
    add_cache_parser(sub, arguments.byte_size)
    from proxy.cli.daemon_command import default_socket_path
    from proxy.commands.status import add_status_parser

    add_status_parser(sub, default_socket_path())
    return parser


def _command_position(argv: Sequence[str]) -> int | None:
    """Where the subcommand is in ``argv`` (the first word that is not a global flag or its value; a
    ``--tls-verify[=BOOL]`` before it is skipped too), None if there is none or a word is ambiguous (``--help``,
    an abbreviated flag): then the whole parser decides."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_global_flags(parser, suppress=False)
    takes_value = {o for a in parser._actions if a.nargs != 0 for o in a.option_strings}
    switches = {o for a in parser._actions if a.nargs == 0 for o in a.option_strings} | {TLS_VERIFY}
    position = 0
    while position < len(argv):
        word = argv[position]
        if not word.startswith("-"):
            return position
        flag = word.split("=", 1)[0]
        if flag in takes_value and "=" not in word:
            position += 1
        elif flag not in takes_value and flag not in switches:
            return None
        position += 1
    return None


def _tls_verify_after_the_command(argv: list[str], command_at: int | None) -> list[str]:
    """skopeo accepts ``--tls-verify[=BOOL]`` before the subcommand (deprecated, with a warning): so do we, by
    moving it after the subcommand, where the subcommand's own flag parses (and checks) it."""
    if command_at is None:
        return argv
    before = [w for w in argv[:command_at] if w == TLS_VERIFY or w.startswith(TLS_VERIFY + "=")]
    if not before:
        return argv
    print(
        f"image-proxy: {TLS_VERIFY} before the command is deprecated (as in skopeo): give it after "
        f"'{argv[command_at]}'",
        file=sys.stderr,
    )
    rest = [w for w in argv[:command_at] if w not in before]
    return [*rest, argv[command_at], *before, *argv[command_at + 1 :]]


def setup_logging(debug: bool) -> None:
    logs.setup_logging(logging.DEBUG if debug else logging.WARNING)


def _connected_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SystemExit(f"image-proxy: --sockfd {fd}: not a socket: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise SystemExit(f"image-proxy: --sockfd {fd}: expected a unix SOCK_SEQPACKET socket")
    return sock


def _serve_options(args: argparse.Namespace, conf: DaemonConfig) -> ProxyOptions:
    """The options of a serving command's flags and the settings file as read (raises ConfigError)."""
    if args.insecure_policy and args.require_signed:
        raise ConfigError("--insecure-policy and --require-signed cannot be used together")
    for name, what in _NOT_YET_EFFECTIVE.items():
        value = getattr(args, name, None)
        if value not in (None, False):
            log.debug("--%s accepted; it has no effect yet (%s)", name.replace("_", "-"), what)
    import attrs

    from proxy.cli.settings import options_from_args, spawned_blob_cache

    options = options_from_args(args, conf=conf)
    cache = spawned_blob_cache(args, conf)
    if cache is None:
        return options
    max_bytes = args.blob_cache_max if args.blob_cache_max is not None else conf.cache_max_size
    return attrs.evolve(options, blob_cache=cache, blob_cache_max=max_bytes)


def run_serve(args: argparse.Namespace) -> int:
    setup_logging(args.debug)
    daemon_path = relay_socket(args.config)
    daemon = _relay_target(args, daemon_path) if daemon_path else None
    if daemon is not None:
        from proxy.server import relay

        relay.relay(_connected_socket(args.sockfd), daemon)
        return 0
    from proxy.config.daemon_conf import load_daemon_conf

    try:
        options = _serve_options(args, load_daemon_conf(args.config))
    except ConfigError as e:
        print(f"image-proxy: {e}", file=sys.stderr)
        return 2
    sock = _connected_socket(args.sockfd)
    import trio

    from proxy.server.session import serve_socket

    trio.run(serve_socket, sock, options)
    return 0


def _relay_target(args: argparse.Namespace, daemon_path: str) -> socket.socket | None:
    """``[spawned] daemon``: a connection to relay the client to (proxy/server/relay.py); None to serve it here,
    because its flags are settings the daemon would not apply or the daemon cannot be reached (one log line)."""
    from proxy.commands.proxy_flags import SESSION_FLAGS, dest, settings_given
    from proxy.server import relay

    given = settings_given(args)
    own = [flag for flag in given if flag not in SESSION_FLAGS]
    if own:
        log.warning(
            "serving this client here, not through the daemon at %s: %s would not apply there",
            daemon_path,
            ", ".join(own),
        )
        return None
    settings = relay.session_settings({dest(flag): getattr(args, dest(flag)) for flag in given})
    if isinstance(settings, str):
        log.warning("serving this client here, not through the daemon at %s: %s", daemon_path, settings)
        return None
    daemon = relay.connect(daemon_path, settings)
    if isinstance(daemon, str):
        log.warning("daemon at %s: %s; serving this client here", daemon_path, daemon)
        copy = relay.auth_file_copy(settings)
        if copy is not None:
            args.authfile = copy  # what was read, for this process's own proxy
        return None
    log.debug("relaying to the daemon at %s", daemon_path)
    return daemon


def command_proxy(args: argparse.Namespace) -> ServeOne:
    """The proxy a client command (``copy``, ``inspect``, ``layers``) starts: exactly what ``image-proxy
    experimental-image-proxy`` would serve with the flags the command passes on (``proxy_arguments``), run in
    this process by ``open_proxy`` (raises ConfigError)."""
    from proxy.commands.proxy_access import proxy_arguments

    serve_args = build_parser().parse_args(["experimental-image-proxy", *proxy_arguments(args)])
    from proxy.config.daemon_conf import load_daemon_conf
    from proxy.server.session import serve_socket

    return functools.partial(serve_socket, options=_serve_options(serve_args, load_daemon_conf(serve_args.config)))


def run_client_command(args: argparse.Namespace) -> int:
    """``inspect``, ``layers``, ``copy``: Ctrl-C or SIGTERM ends them with one line and status 130/143 (the work
    cancelled and cleaned up, see proxy/commands/interrupts.py); a closed stdout (``| head``) ends them quietly
    with 141, the status of a Unix tool killed by SIGPIPE."""
    from proxy.commands.interrupts import Interrupted

    command = args.command
    try:
        setup_logging(args.debug)
        if args.proxy_socket:
            from proxy.commands.proxy_access import absolute_local_reference

            args.reference = absolute_local_reference(args.reference)
        else:
            try:
                args.serve = command_proxy(args)
            except ConfigError as e:
                print(f"image-proxy {command}: {e}", file=sys.stderr)
                return 2
        return args.run(args)
    except Interrupted as e:
        print(f"image-proxy {command}: interrupted", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # before the command's work started
        print(f"image-proxy {command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # nothing more reaches the reader, not even at exit's flush
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed; an unknown flag is reported with the subcommand's usage, not the top level's."""
    words = list(argv)
    command_at = _command_position(words)
    words = _tls_verify_after_the_command(words, command_at)
    command = words[command_at] if command_at is not None else None
    parser = build_parser(serving_only=command in SERVE_COMMANDS)
    args, unknown = parser.parse_known_args(words)
    if unknown:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "version":
        print(f"Version:   {__version__}\nProtocol:  {PROTOCOL_VERSION}\nPython:    {sys.version.split()[0]}")
        return 0
    if args.command in SERVE_COMMANDS:
        return run_serve(args)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    if args.command == "cache":
        from proxy.commands.cache import run_cache

        return run_cache(args)
    if args.command == "daemon":
        from proxy.cli.daemon_command import run_daemon

        return run_daemon(args)
    if args.command == "status":
        from proxy.commands.status import run_status

        return run_status(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
