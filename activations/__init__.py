"""Models, hook points, text sources, token packing and the streaming ActivationStore.

Kept import-light: import submodules (``activations.store``, ``activations.models``) directly.
"""
