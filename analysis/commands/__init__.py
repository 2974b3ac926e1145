"""The analysis commands: `sae eval`, `sae inspect`, `sae steer`, `sae catalogue`."""
