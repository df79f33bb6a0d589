"""Using a finished run's checkpoint: export its weights, generate images with it."""
