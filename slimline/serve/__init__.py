"""Serving: a speculative-decoding engine and an OpenAI-compatible HTTP server around it."""
