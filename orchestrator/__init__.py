"""Ray-side machinery of rayclip: data preparation and streaming, training, checkpoints, tracking, tuning."""
