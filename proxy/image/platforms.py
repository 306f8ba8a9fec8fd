"""Platforms, pure: this host's (as Go names it: GOOS, GOARCH, the variant), the ones wanted (with the
``--override-*`` flags), and the instance of a manifest list or OCI index chosen for them, as containers/image
chooses."""

from __future__ import annotations

import platform as _host
import sys

import attrs

from protocol.digests import is_valid_digest
from proxy.image.formats import (
    ANNOTATION_ZSTD,
    ANNOTATION_ZSTD_CHUNKED_SENTINEL,
    DOCKER_V2_LIST,
    DOCKER_V2S1,
    DOCKER_V2S1_SIGNED,
    DOCKER_V2S2,
    OCI_INDEX,
    OCI_INDEX_STRUCT,
    OCI_MANIFEST,
    SCHEMA2_LIST,
    ManifestError,
    decode,
    normalized_mime_type,
    reject_ambiguous,
)
from proxy.image.gojson import (
    go_quote,
)

# ---- platforms and instance selection --------------------------------------------------------


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str = ""


_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64",
    "loongarch64": "loong64",
}

# From most capable to most compatible; architectures without variants have no entry.
_VARIANT_COMPATIBILITY = {"amd64": ("v4", "v3", "v2"), "arm": ("v8", "v7", "v6", "v5"), "arm64": ("v8",)}

_ARM_CPU_ARCH_VARIANTS = {
    "8": "v8",
    "aarch64": "v8",
    "7m": "v7",
    "?(12)": "v7",
    "?(13)": "v7",
    "?(14)": "v7",
    "?(15)": "v7",
    "?(16)": "v7",
    "?(17)": "v7",
    "6": "v6",
    "6tej": "v6",
    "5": "v5",
    "5t": "v5",
    "5te": "v5",
    "5tej": "v5",
    "4": "v4",
    "4t": "v4",
    "3": "v3",
}


def host_os() -> str:
    """``runtime.GOOS`` of this host."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "win32":
        return "windows"
    if sys.platform.startswith("freebsd"):
        return "freebsd"
    return sys.platform


def host_arch() -> str:
    """``runtime.GOARCH`` of this host."""
    machine = _host.machine().lower()
    if machine in _GOARCH:
        return _GOARCH[machine]
    if machine.startswith("arm"):
        return "arm"
    return machine


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() == key.lower():
                    return value.strip()
    except OSError:
        return None
    return None


def _amd64_level(flags: set[str]) -> str:
    v2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"} <= flags
    v3 = v2 and {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    return "v4" if v4 else "v3" if v3 else "v2" if v2 else "v1"


def host_variant(os_name: str, arch: str) -> str:
    """The detected CPU variant (c/image ``getCPUVariant``)."""
    if os_name in ("darwin", "windows"):
        return {"arm64": "v8", "arm": "v7", "amd64": "v1"}.get(arch, "")
    if arch in ("arm", "arm64"):
        value = _cpuinfo("Cpu architecture")
        if value is None:
            return ""
        value = value.lower()
        if value == "7":
            model = (_cpuinfo("model name") or "").lower()
            return "v6" if model.startswith("armv6-compatible") else "v7"
        return _ARM_CPU_ARCH_VARIANTS.get(value, "")
    if arch == "amd64":
        flags = _cpuinfo("flags")
        return _amd64_level(set(flags.split())) if flags else "v1"
    return ""


def _normalize_variant(arch: str, variant: str) -> str:
    return "" if arch == "amd64" and variant == "v1" else variant


def wanted_platforms(
    override_os: str | None = None,
    override_arch: str | None = None,
    override_variant: str | None = None,
    *,
    detect_amd64_variant: bool = False,
) -> list[Platform]:
    """Candidate platforms in preference order, like c/image ``WantedPlatforms``."""
    arch = override_arch or host_arch()
    os_name = override_os or host_os()
    variant = ""
    if not override_arch and (arch != "amd64" or detect_amd64_variant):
        variant = host_variant(host_os(), arch)
    if override_variant:
        variant = override_variant
    variant = _normalize_variant(arch, variant)
    if variant:
        order = _VARIANT_COMPATIBILITY.get(arch, ())
        variants = list(order[order.index(variant) :]) if variant in order else [variant]
        variants.append("")
    else:
        variants = [""]
        if arch != "amd64":
            variants.extend(_VARIANT_COMPATIBILITY.get(arch, ()))
    return [Platform(os=os_name, architecture=arch, variant=v) for v in variants]


def _matches(os_name: str, arch: str, variant: str, wanted: Platform) -> bool:
    return (
        arch == wanted.architecture
        and os_name == wanted.os
        and _normalize_variant(arch, variant) == _normalize_variant(wanted.architecture, wanted.variant)
    )


def _platform_index(os_name: str, arch: str, variant: str, platforms: list[Platform]) -> int | None:
    for i, w in enumerate(platforms):
        if _matches(os_name, arch, variant, w):
            return i
    return None


def choose_instance(raw_list: bytes, mime: str, platforms: list[Platform]) -> str:
    """The digest of the list instance for ``platforms`` (c/image ``ChooseInstance``)."""
    if not platforms:
        raise ManifestError("no wanted platforms")
    w0 = platforms[0]
    wanted_text = f"architecture {go_quote(w0.architecture)}, variant {go_quote(w0.variant)}, OS {go_quote(w0.os)}"
    normalized = normalized_mime_type(mime)
    if normalized == DOCKER_V2_LIST:
        lst = decode(raw_list, SCHEMA2_LIST, "docker manifest list")
        reject_ambiguous(raw_list, DOCKER_V2_LIST, ("manifests",))
        entries = lst["manifests"] or []
        for wanted in platforms:
            for d in entries:
                p = d["platform"]
                if _matches(p["os"], p["architecture"], p["variant"], wanted):
                    return _checked_instance_digest(d["digest"])
        raise ManifestError(f"no image found in manifest list for {wanted_text}")
    if normalized == OCI_INDEX:
        index = decode(raw_list, OCI_INDEX_STRUCT, "OCI image index")
        reject_ambiguous(raw_list, OCI_INDEX, ("manifests",))
        best: tuple[int, int, int, int] | None = None
        best_digest = ""
        for position, d in enumerate(index["manifests"] or []):
            rank = sys.maxsize
            if d["platform"] is not None:
                p = d["platform"]
                found = _platform_index(p["os"], p["architecture"], p["variant"], platforms)
                if found is None:
                    continue
                rank = found
            annotations = d["annotations"] or {}
            is_zstd = annotations.get(ANNOTATION_ZSTD) == "true"
            sentinel = annotations.get(ANNOTATION_ZSTD_CHUNKED_SENTINEL) == "true"
            key = (rank, 0 if is_zstd else 1, 0 if sentinel else 1, position)
            if best is None or key < best:
                best, best_digest = key, d["digest"]
        if best is None:
            raise ManifestError(f"no image found in image index for {wanted_text}")
        return _checked_instance_digest(best_digest)
    if normalized in (DOCKER_V2S1, DOCKER_V2S1_SIGNED, OCI_MANIFEST, DOCKER_V2S2):
        raise ManifestError("Treating single images as manifest lists is not implemented")
    raise ManifestError(f"Unimplemented manifest list MIME type {mime} (normalized as {normalized})")


def _checked_instance_digest(d: str) -> str:
    if not is_valid_digest(d):
        raise ManifestError(f"invalid instance digest {go_quote(d)} in manifest list")
    return d
