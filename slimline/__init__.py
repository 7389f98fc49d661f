"""slimline: compress, export, measure and serve causal language models from one YAML file."""

__version__ = "0.1.0"
