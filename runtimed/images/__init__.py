"""Images: media types, platforms, manifests, archive import/export, unpack, registry."""
