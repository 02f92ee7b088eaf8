#!/bin/sh
# require-env VAR... -- COMMAND: refuse to start unless every VAR is set and non-empty, then exec COMMAND.
# Compose interpolates ${VAR:?} for every profile at once, so the `cluster` profile's secret is checked here
# instead: the default stack must start without it.
set -eu
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  eval "value=\${$1:-}"
  if [ -z "$value" ]; then
    echo "error: $1 is not set; add it to .env (see .env.example)" >&2
    exit 64
  fi
  shift
done
[ "$#" -gt 0 ] && shift
exec "$@"
