"""What every method builds on, knowing none of them: the config and its keys, validation, the model registry and
lookup, safe checkpoints, resume, file and cache helpers, and the trainers that cache side models."""
