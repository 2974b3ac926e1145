"""`sae train`: the command that wires the data side, the dictionary and the trainer together."""
