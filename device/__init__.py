"""The on-device runtime: keeps GE frozen, trains the Local Expert and Gating
Network on the user's own samples (which never leave the device), and routes
each input to GE or LE. Imports and personalizes with numpy and a runtime
(onnxruntime-training) alone; torch is never needed here.
"""

from device.runtime import DeviceRuntime, Prediction

__all__ = ["DeviceRuntime", "Prediction"]
