"""Generated from protos/baton/v1 by `make protos`; do not edit."""
