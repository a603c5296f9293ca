"""Networks: deep-stem dilated ResNets, PSP / ASPP / aux heads, the WGAN discriminator."""

from skd_jax.models.segmenter import MODEL_PRESETS, Segmenter, create_segmenter

__all__ = ['MODEL_PRESETS', 'Segmenter', 'create_segmenter']
