"""The pipeline stages: one click command per stage, run as `python -m stages.<name>` (see dvc.yaml).

Not empty on purpose: every stage lists this file as a dependency, and DVC warns about an empty one.
"""
