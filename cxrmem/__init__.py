"""cxrmem: audit text-to-image chest X-ray diffusion models for training-data memorization."""
