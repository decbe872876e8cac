"""shimd: the per-container shim. It outlives runtimed, owns the container's processes
(init and execs) as their child subreaper, records their exit statuses durably and hands
lifecycle events to runtimed through a persisted outbox. See docs/shim.md.
"""

__version__ = "0.1.0"
