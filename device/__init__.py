"""The on-device runtime: keeps GE frozen, trains the Local Expert and Gating
Network on the user's own samples (which never leave the device), and routes
each input to GE or LE. Runs on ONNX Runtime, ExecuTorch or LiteRT (and a
torch reference), chosen in ``device.backends``; imports and personalizes
with numpy and onnxruntime-training alone, torch never needed.
"""

from edgetailor.device.runtime import DeviceRuntime, Prediction

__all__ = ["DeviceRuntime", "Prediction"]
