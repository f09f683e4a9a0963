"""Experiments that are more than one training run: sweeps over methods and seeds (see `main.EXPERIMENTS`)."""
