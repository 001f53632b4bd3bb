"""Hyperparameter search: Ray Tune runs one `ray-app train` run per trial."""
