"""Image sources, preprocessing, and the latent cache (writer, manifest, reader)."""
