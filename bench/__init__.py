"""`make bench`: runtimed side by side with containerd + runc, in the same run."""
