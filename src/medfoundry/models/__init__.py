"""Backbones by name (through timm), encoders and the checkpoint folder format."""
