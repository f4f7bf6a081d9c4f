"""Networks: the registry of architectures, their metadata, and their layers."""
