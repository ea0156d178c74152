"""tinystories-jax: make TinyStories-style datasets, train tiny story models in JAX, grade them."""

__version__ = "0.1.0"
