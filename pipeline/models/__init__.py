"""Model building blocks: SSL encoders and parallel adapters."""
