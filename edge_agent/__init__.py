"""edge_agent: everything that runs on a device, and the wire protocol.

Imports :mod:`compress`; must import and run without flwr, fastapi, typer, onnx or
scikit-learn installed (a test checks this in a fresh interpreter).
"""

__version__ = "0.1.0"
