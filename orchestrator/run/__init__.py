"""One run: config -> Ray Train job (runner), its data plan, checks, progress, hub actor, run directory (files), Ray start-up."""
