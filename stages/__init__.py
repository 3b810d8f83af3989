"""The DVC stages, one module each, run from the repository root as `python -m stages.<name>`."""
