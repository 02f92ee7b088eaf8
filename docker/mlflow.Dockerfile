# The MLflow tracking server of the compose stack. Versions are the ones the project tests against
# (tests/test_tracking_compose.py compares them with the installed packages). The command is not baked in:
# docker-compose.yml runs tracking.server.compose_commands(), the same server_command() the tests run.
# No secrets here: the database password arrives as PGPASSWORD, auth secrets as environment, all from .env.
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG_VERSION=3.3.9

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini

RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]==${PSYCOPG_VERSION}" \
 && useradd --create-home --uid 1000 mlflow \
 && mkdir -p /mlflow/artifacts /mlflow/auth \
 && chown -R mlflow:mlflow /mlflow

COPY basic_auth.ini /etc/mlflow/basic_auth.ini

# Named volumes mounted here start with the ownership above, so the server never needs root.
USER mlflow
WORKDIR /mlflow
EXPOSE 5000
