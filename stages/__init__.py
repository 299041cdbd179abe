"""One thin script per pipeline stage, run as `python -m stages.<name>` (see dvc.yaml)."""
