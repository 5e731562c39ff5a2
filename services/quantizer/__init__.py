"""The quantizer: per-layer bit-widths (8/4/2) from measured sensitivity, under a size budget."""
