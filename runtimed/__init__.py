"""runtimed: a container runtime manager, wire-compatible with containerd's v1 gRPC API."""

__version__ = "0.1.0"
