"""Training: the configuration and recipes, the engine, optimiser and schedule, the run folder, and `fit()`."""
