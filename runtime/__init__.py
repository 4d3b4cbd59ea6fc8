"""Torch-free inference for ram-edge bundles: numpy, Pillow and a backend (onnxruntime, TensorRT, OpenVINO).

    from ram_edge.runtime import Tagger, TextEncoder, Vocabulary
    tagger = Tagger("bundle/")
    print(tagger.tag("photo.jpg").tags)
    tagger.set_vocabulary(Vocabulary.from_names(["otter", "kayak"], tagger.text_encoder))   # open-set

Importing this package imports neither torch, onnx, onnxruntime, tensorrt nor openvino: backends load lazily.
"""

from ram_edge.bundle_format import BundleError
from ram_edge.vocabulary import Vocabulary

from .backends import (
    Backend, TensorInfo, available_backends, get_backend_class, register_backend, resolve_backend,
)
from .preprocess import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, Preprocessor
from .caption import CaptionResult
from .tagger import ClassResult, TagResult, Tagger, sigmoid
from .text_encoder import TextEncoder

__all__ = [
    "Backend",
    "BundleError",
    "CaptionResult",
    "ClassResult",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "Preprocessor",
    "TagResult",
    "Tagger",
    "TensorInfo",
    "TextEncoder",
    "Vocabulary",
    "available_backends",
    "get_backend_class",
    "register_backend",
    "resolve_backend",
    "sigmoid",
]
