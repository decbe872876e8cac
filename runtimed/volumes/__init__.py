"""Named volumes: directories whose lifecycle is independent of any container."""
