"""Generated protobuf and gRPC modules. Regenerate with `make proto`; do not edit."""
