"""The implementation of kwng_jax; import the public names from ``kwng_jax``."""
