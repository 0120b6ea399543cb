"""crossent on JAX arrays (placeholder: the crossent.jax package proper comes from its own branch)."""
