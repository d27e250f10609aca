"""smartcrop: learned photo cropping.

Importing this package is cheap: torch is only imported when a model is built or loaded.
"""

__version__ = "0.1.0"
