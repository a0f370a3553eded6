"""diffusion-worker: a cold-start-tuned serverless GPU worker for diffusers models."""

__version__ = "0.1.0"
