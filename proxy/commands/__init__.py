"""The commands for people (inspect, layers, copy, cache): clients of the protocol, which never import the server."""
