"""vmimages."""
