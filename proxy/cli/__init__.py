"""Entry points: the command line (``image-proxy …``) and daemon mode's start-up."""
