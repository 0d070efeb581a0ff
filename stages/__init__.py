"""Thin click entrypoints, one per DVC stage (`python -m stages.<name>`); the logic lives in `src/baize/`."""
