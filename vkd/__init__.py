"""The side modules of the project: what the reading path (model.py, data.py, train.py,
evaluate.py) calls by name. This file only makes the folder importable."""
