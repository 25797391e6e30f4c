"""Discriminators: networks, losses, post-hoc training and calibration.

- `architectures`: MLP, DCGAN-style conv and pair networks.
- `losses`: BCE and the implicit-MH bounds (independent and Markov forms).
- `training`: `train_discriminator`, `train_pair_discriminator` for a frozen generator.
- `calibration`: raw logit -> calibrated logit (isotonic, logistic, beta) with reports.
- `metrics`: ECE, Brier score, Dawid's Z.

Import the submodule you need; this package imports nothing on its own.
"""
