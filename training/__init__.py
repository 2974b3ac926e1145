"""The training loop that turns an ActivationStore into a trained SAE."""
