"""Data: the Cityscapes class table, the synthetic dataset, and the tf.data input pipeline.

`cityscapes` and `synthetic` need only NumPy and Pillow; `pipeline` imports TensorFlow and
tensorflow-datasets, so it is not imported here: `from skd_jax.data import pipeline` when needed.
"""
