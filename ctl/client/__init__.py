"""The Python client library for runtimed (and any containerd v1 API server)."""

from ctl.client.cio import Stdio
from ctl.client.client import DEFAULT_ADDRESS, Client, RunningContainer
from ctl.client.containers import CreateOptions
from runtimed.oci.spec import Mount, SpecOptions

__all__ = ["Client", "CreateOptions", "DEFAULT_ADDRESS", "Mount", "RunningContainer", "SpecOptions", "Stdio"]
