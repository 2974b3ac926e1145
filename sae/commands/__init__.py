"""`sae export`: the command that writes a trained SAE for other tools."""
