"""The evaluation engine: tasks x encoders x adapters x label fractions x seeds, one grid for every entry point."""
