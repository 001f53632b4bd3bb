"""Base model loading and adapters."""
