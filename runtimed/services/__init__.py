"""Thin gRPC adapters: each module translates proto <-> core objects and nothing more."""
