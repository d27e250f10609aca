"""smartcrop: learned photo cropping (SAC-Net: spatial-aware feature and rank consistency).

Importing this package is cheap: torch is only imported when a model is built or loaded.

>>> from smartcrop import Cropper
>>> crops = Cropper().crop("photo.jpg", ratios=["16:9"])
"""

__version__ = "0.1.0"

__all__ = ["Cropper", "Crop", "__version__"]


def __getattr__(name):  # lazy: keep `import smartcrop` (and the CLI's --help) free of torch
    if name in {"Cropper", "Crop"}:
        from . import cropper

        return getattr(cropper, name)
    raise AttributeError(f"module 'smartcrop' has no attribute {name!r}")
