"""Ray-side machinery of rayclip: data preparation and streaming, training, checkpoints, tracking, tuning."""

import os

# MLflow's telemetry client fetches its settings from the internet in a background thread started at
# import; where that fails (offline clusters, CI) the thread deletes an environment variable, and a
# tracking request that is copying os.environ at that moment fails with a KeyError, so the run would
# lose its tracking. Off unless the user asks for it (MLFLOW_DISABLE_TELEMETRY=false).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
