"""Prefect flows for clipops. Flows stay thin: each task calls clip_core or clip_train."""
