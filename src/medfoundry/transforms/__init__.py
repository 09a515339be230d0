"""Domain-specific view steps for SSL pre-training (pathology, radiology, ophthalmology) and their presets."""
