"""Data: the datasets' class tables, their tfds builders, and the tf.data input pipeline.

`spec` needs only NumPy; the dataset modules, `datasets`, `pipeline`, `checks` and `synthetic`
import TensorFlow / tensorflow-datasets, so nothing is imported here: `from skd_jax.data import
pipeline` where data is read.
"""
