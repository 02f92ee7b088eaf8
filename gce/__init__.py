"""The science of gce-sweeps: losses, models, datasets, attacks, training and robustness evaluation.

Pure PyTorch: nothing here imports ray or mlflow, so the same code runs in a notebook, a script or a trial.
"""

__version__ = "0.1.0"

# The plugin API (gce.plugins), exported lazily: `import gce` stays free of torch until it is used.
_PLUGIN_API = ("PluginError", "load_entry_points", "load_plugins", "register_attack", "register_dataset",
               "register_loss", "register_model")


def __getattr__(name: str):
    if name in _PLUGIN_API:
        from gce import plugins

        return getattr(plugins, name)
    raise AttributeError(f"module 'gce' has no attribute {name!r}")
