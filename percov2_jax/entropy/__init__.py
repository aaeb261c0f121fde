"""Entropy modelling of the hyper-latent tokens: coding schedules, priors and the range coder."""
