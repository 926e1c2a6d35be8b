"""Model loading and per-architecture facts."""
