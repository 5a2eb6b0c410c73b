"""The I2V pipeline: plain functions over modules and tensors (no file paths)."""
