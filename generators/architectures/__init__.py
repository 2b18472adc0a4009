"""Generator architectures built from MONAI networks."""
