"""From the command line and the config files to the frozen settings a session runs with: registry settings,
credentials, signature policy, limits. ``config.toml`` is read once per start or reload and passed along."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import attrs

from proxy import __version__
from proxy.config import ConfigError, CredentialSource, RegistriesConf, load_registries_conf
from proxy.config.daemon_conf import DaemonConfig, load_daemon_conf
from proxy.http.timeouts import Timeouts
from proxy.policy import ImagePolicy
from proxy.registry.settings import RegistrySettings, ResumePolicy
from proxy.server.limits import SessionLimits
from proxy.server.options import ProxyOptions
from proxy.sources.base import SourceOptions

log = logging.getLogger("image-proxy")


def registry_settings_from_args(args: argparse.Namespace, conf: DaemonConfig) -> RegistrySettings:
    """Registry settings: flags, else the daemon's config file, else the defaults. A registries.conf that cannot
    be read makes every docker:// open fail with the reason (local transports keep working): the error is the
    user's to fix, not a reason not to start. A bad daemon config file is a ConfigError (the caller exits)."""
    agent = f"image-proxy/{__version__}"
    if args.user_agent_prefix:
        agent = f"{args.user_agent_prefix} {agent}"

    def pick(name: str, default: float) -> float:
        flag = getattr(args, name, None)
        if flag is not None:
            return flag
        value = getattr(conf, name)
        return default if value is None else value

    settings = RegistrySettings(
        tls_verify=args.tls_verify is not False,
        cert_dir=args.cert_dir,
        user_agent=agent,
        timeouts=Timeouts(
            connect=pick("connect_timeout", 30.0),
            tls=pick("tls_handshake_timeout", 10.0),
            headers=pick("response_header_timeout", 30.0),
            stall=pick("stall_timeout", 30.0),
        ),
        resume=ResumePolicy(max_resumes=int(pick("max_resumes", 10))),
    )
    try:
        registries = load_registries_conf(args.registries_conf or None)
    except ConfigError as e:
        log.error("%s", e)
        return attrs.evolve(settings, registries_error=str(e))
    return attrs.evolve(settings, registries=registries)


def credentials_from_args(args: argparse.Namespace, registries: RegistriesConf) -> CredentialSource:
    return CredentialSource.from_options(
        authfile=args.authfile,
        creds=args.creds,
        username=args.username,
        password=args.password,
        registry_token=args.registry_token,
        no_creds=args.no_creds,
        credential_helpers=registries.credential_helpers,
    )


def policy_from_args(args: argparse.Namespace) -> ImagePolicy:
    """``--policy``, ``--insecure-policy``, ``--require-signed``, ``--registries.d``. A policy that cannot be read
    makes every OpenImage fail with the reason (skopeo's text when there is no policy.json at all)."""
    policy = ImagePolicy.from_flags(
        policy_path=args.policy,
        insecure=args.insecure_policy,
        require_signed=args.require_signed,
        registries_d=args.registries_d,
    )
    for problem in (policy.error, policy.registries_d_error):
        if problem is not None:
            log.error("signature policy: %s", problem)
    return policy


def limits_from_conf(conf: DaemonConfig, base: SessionLimits) -> SessionLimits:
    """``base`` with what the config file's [limits] sets; 0 lifts the limits that can be lifted."""
    values = {}
    for name in ("open_images", "open_pipes", "requests_per_second"):
        value = getattr(conf, name)
        if value is not None:
            values[name] = value or None
    if conf.queued_request_bytes is not None:
        values["queued_bytes"] = conf.queued_request_bytes or None
    for name in ("request_burst", "max_request_size", "concurrent_requests", "worker_threads"):
        value = getattr(conf, name)
        if value is not None:
            values[name] = value
    return attrs.evolve(base, **values)


def options_from_args(
    args: argparse.Namespace, base_limits: SessionLimits | None = None, conf: DaemonConfig | None = None
) -> ProxyOptions:
    """Everything a session needs, from the flags and the config files (raises ConfigError). ``conf``: the
    daemon's config file as already read (read here otherwise): one reading per start or reload, so a file edited
    meanwhile cannot mix two versions."""
    if conf is None:
        conf = load_daemon_conf(args.config)
    registry = registry_settings_from_args(args, conf)
    return ProxyOptions(
        limits=limits_from_conf(conf, base_limits if base_limits is not None else SessionLimits()),
        blob_cache=args.blob_cache,
        blob_cache_max=args.blob_cache_max,
        registry=registry,
        credentials=credentials_from_args(args, registry.registries),
        source_options=SourceOptions(tmpdir=args.tmpdir or None, shared_blob_dir=args.shared_blob_dir),
        policy=policy_from_args(args),
        override_os=args.override_os,
        override_arch=args.override_arch,
        override_variant=args.override_variant,
        debug=args.debug,
    )


def spawned_blob_cache(args: argparse.Namespace, conf: DaemonConfig) -> str | None:
    """The blob cache of a spawned proxy: ``--blob-cache``; else the settings file's ``[cache]`` when it says
    ``enabled = true`` (its ``dir``, else the daemon's default directory), so that every proxy an update agent
    spawns shares one verified cache; else none. A cache this process cannot create or write (an agent that runs
    its proxy as another user) is skipped with one log line: never an error for the pull."""
    if args.blob_cache is not None:
        return str(args.blob_cache)
    if conf.cache_enabled is not True:
        return None
    from proxy.cache.files import make_private_dirs
    from proxy.cli.daemon_command import default_cache_dir

    root = conf.cache_dir or default_cache_dir()
    blobs = os.path.join(root, "blobs")
    try:
        make_private_dirs(Path(blobs))
    except OSError as e:
        log.warning("blob cache %s ([cache] of the settings file): cannot use it: %s; no cache", root, e.strerror)
        return None
    if not os.access(blobs, os.R_OK | os.W_OK | os.X_OK):
        log.warning(
            "blob cache %s ([cache] of the settings file): not writable by uid %d; no cache (give the directory "
            "to this user, see README 'Blob cache')",
            root,
            os.getuid(),
        )
        return None
    return root


__all__ = [
    "credentials_from_args",
    "limits_from_conf",
    "options_from_args",
    "policy_from_args",
    "registry_settings_from_args",
    "spawned_blob_cache",
]
