"""Container networks: bridge/host/none/container drivers, IPAM, name files, published ports."""
