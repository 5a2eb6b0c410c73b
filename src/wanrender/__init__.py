"""wanrender: fast Wan 2.2 image-to-video rendering.

Importing the package does no work: no device probing, no downloads.
"""

__version__ = "0.1.0"
