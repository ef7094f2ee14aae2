"""Launchers: translate a scheduler's environment into torchrun's variables, then call gan_dist.train."""
