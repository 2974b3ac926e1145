"""`sae cache`: run the model once and keep its activations on disk."""
