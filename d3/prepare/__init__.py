"""Training-data preparation: raw releases -> the plain training-folder format (see ``common``).

``python -m d3.prepare hypersim|vkitti|sintel|p3m --src RAW --dst OUT [options]``
"""

from .common import MANIFEST, list_samples, read_manifest

SOURCES = ("hypersim", "vkitti", "sintel", "p3m")

__all__ = ["MANIFEST", "SOURCES", "list_samples", "read_manifest"]
