"""The built-in OCI runtime: a command with runc's command line (the subset a shim uses).

`python3 -m shimd.oci [--root DIR] [--log FILE] [--log-format json] <command> ...` so the
shim drives it exactly like runc, and runc or crun can be named instead. The command is a
fresh single-threaded process (namespace setup needs that); it never imports grpc and
imports as little as it can, because container lifecycle latency is benchmarked.
"""
