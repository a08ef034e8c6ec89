"""prefix-router: a prompt-cache-aware request router for pools of SGLang servers."""

__all__ = ["__version__"]

__version__ = "0.1.0"
