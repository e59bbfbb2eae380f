"""MLflow model logging, registration, promotion and serving for CLIP checkpoints."""
