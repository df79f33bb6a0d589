"""Sweeps: the sweep file, its trials under Ray Tune, their progress board and metric names."""
