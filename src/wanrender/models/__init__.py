"""Networks (one file each), checkpoint loading and LoRA.

This layer knows nothing of CLIs, profiles or services.
"""
