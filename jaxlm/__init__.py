"""jaxlm: readable, scalable language-model pre-training in JAX."""

__version__ = "0.1.0"
