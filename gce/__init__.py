"""The science of gce-sweeps: losses, models, datasets, attacks, training and robustness evaluation.

Pure PyTorch: nothing here imports ray or mlflow, so the same code runs in a notebook, a script or a trial.
"""

__version__ = "0.1.0"
