"""avatar_jax: full-duplex talking-listening avatars in JAX."""
__version__ = "0.1.0"
