"""OCI runtime specs: the defaults containerd and Docker give a container, built from an
image config and the user's options. Used by clients (ctl) and by the daemon's builder."""
