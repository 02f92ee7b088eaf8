"""Ray Tune + Optuna sweeps from YAML specs, and the gce-sweep command line."""
