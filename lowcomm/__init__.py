"""lowcomm: train one model across many machines joined by slow, unreliable links."""

__version__ = "0.1.0"
