"""Image formats, pure: manifests and configs, Go-compatible JSON, docker references."""
