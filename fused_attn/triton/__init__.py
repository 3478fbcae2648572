"""Triton kernels, one family per module: attention, layer_norm, feed_forward."""
