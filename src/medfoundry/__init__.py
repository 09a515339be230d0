"""medfoundry: pre-train, adapt and benchmark foundation models for medical imaging."""

__version__ = "0.1.0"
