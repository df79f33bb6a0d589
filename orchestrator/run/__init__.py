"""One run: config to Ray Train job (runner), its checks, progress, hub actor, run directory, Ray start-up."""
