"""Asking both sides for a decision: our proxy's OpenImage, and the real skopeo (``skopeo copy --policy``).

Debian's skopeo 1.9.3 speaks proxy protocol 0.2.3, whose OpenImage checks no policy, so the reference
decision is ``skopeo copy``, which checks the same policy file for the same source image. ``copy`` without
``--all`` checks the instance it copies out of a list (the list itself is not checked); our proxy accepts a
list when the list or the chosen instance is accepted, so the two agree whenever the instance decides.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.support.images import AMD64, require_skopeo

REJECTED = "rejected by signature policy"


@attrs.frozen
class Decision:
    accepted: bool
    text: str  # the error text when refused


def write_policy(directory: Path, doc: dict, name: str = "policy.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(doc))
    return path


async def ours(argv: Sequence[str], flags: Sequence[str], references: Sequence[str]) -> list[Decision]:
    """Open each reference in one of our proxies started with ``flags``."""
    decisions = []
    async with ImageProxy.spawn([*argv, *AMD64, *flags]) as proxy:
        for reference in references:
            try:
                image = await proxy.open_image(reference)
            except ProxyError as e:
                decisions.append(Decision(False, str(e)))
            else:
                await proxy.close_image(image)
                decisions.append(Decision(True, ""))
    return decisions


def skopeo_decision(reference: str, global_flags: Sequence[str]) -> Decision:
    """``skopeo copy`` of ``reference`` to a scratch dir under the policy: accepted, or refused ("Source image
    rejected", or a policy it cannot load)."""
    with tempfile.TemporaryDirectory(prefix="policy-ref-") as scratch:
        argv = [
            require_skopeo(),
            *global_flags,
            *AMD64,
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            reference,
            f"dir:{scratch}/copy",
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode == 0:
        return Decision(True, "")
    if "Source image rejected" in result.stderr or "Error loading trust policy" in result.stderr:
        return Decision(False, result.stderr.strip())
    raise AssertionError(f"skopeo failed for another reason than the policy: {' '.join(argv)}: {result.stderr}")
