"""Sparse autoencoder architectures, their configs and the on-disk format (SAELens-compatible)."""
