"""The ``docker://`` transport, everything distribution-specific: the registry client (token auth, retries,
endpoints), the image source with its mirrors, resumable blob bodies."""
