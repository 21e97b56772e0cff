"""Generated gRPC code for the tidings.v1 API (clients/generate.sh)."""
