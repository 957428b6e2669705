"""compress: fedge's leaf package: artifacts, signing, model export, quantization.

Imports only numpy and cryptography at import time; onnx and
``onnxruntime.quantization`` are imported inside the functions that need them.
"""

__version__ = "0.1.0"
