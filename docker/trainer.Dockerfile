# Ray head and workers of the compose `cluster` profile: CUDA PyTorch plus this package (gce, sweeps,
# tracking). torch comes from the base image; pip adds the rest of the dependencies around it.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/gce-sweeps
COPY pyproject.toml README.md ./
COPY gce gce
COPY sweeps sweeps
COPY tracking tracking
RUN pip install . \
 && python -c "import gce, sweeps, tracking, torch; print('torch', torch.__version__)"

COPY docker/require-env.sh /usr/local/bin/require-env
RUN useradd --create-home --uid 1000 gce \
 && mkdir -p /home/gce/ray_results \
 && chown -R gce:gce /home/gce
USER gce
WORKDIR /home/gce
