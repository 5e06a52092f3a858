"""CLI command modules; each has register(app) and imports nothing heavy at module level."""
