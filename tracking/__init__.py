"""MLflow tracking: the server (embedded default and docker stack), run logging and queries."""
