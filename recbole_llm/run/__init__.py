"""Running the models: the command line, quick start, preflight checks, hyperparameter tuning, the DDP launch, and
recommendations of a saved checkpoint."""
