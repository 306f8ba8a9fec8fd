"""Signature policy (containers-policy.json): what OpenImage checks before it opens an image.

``ImagePolicy.from_flags`` reads the policy and registries.d as skopeo does; ``ImagePolicy.check`` accepts an
image or raises :class:`PolicyRejected` naming the image, the scope that matched and why.
"""

from proxy.policy.errors import PolicyFileError, PolicyRejected
from proxy.policy.evaluate import INSECURE_POLICY, ImagePolicy
from proxy.policy.policy_file import Policy, default_policy_path, load_policy, parse_policy

__all__ = [
    "INSECURE_POLICY",
    "ImagePolicy",
    "Policy",
    "PolicyFileError",
    "PolicyRejected",
    "default_policy_path",
    "load_policy",
    "parse_policy",
]
