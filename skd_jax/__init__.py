"""skd_jax: Structured Knowledge Distillation for semantic segmentation in JAX/Flax."""
