"""Self-supervised pre-training: methods registered by name over one shared trainer."""
