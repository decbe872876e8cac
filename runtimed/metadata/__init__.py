"""The sqlite metadata store: namespaces, images, containers, leases, labels, GC."""
