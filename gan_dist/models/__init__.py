"""The networks, built from the data's description: registered architectures, their layers, the EMA of G,
and G rebuilt from a checkpoint."""
