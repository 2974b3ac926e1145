"""Sparse autoencoder architectures, their configs and the on-disk format (SAELens-compatible)."""

# Load the architecture registry before any architecture module: sae.registry imports every built-in
# architecture, and some subclass others (batchtopk -> topk), so importing e.g. sae.topk first would
# otherwise reach `from sae.topk import TopKSAE` while sae.topk is only half initialised.
import sae.registry  # noqa: E402,F401
