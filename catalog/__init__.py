"""The model of the fleet: manifests, naming, families, the merged view. Pure logic."""
