"""privlm: design, train, diagnose and cost language models for private inference."""
__version__ = "0.1.0"
