"""The on-device runtime: keeps GE frozen, trains the Local Expert and Gating
Network on the user's own samples (which never leave the device), and routes
each input to GE or LE. Runs on ONNX Runtime, ExecuTorch or LiteRT (and a
torch reference), chosen in ``backends``; imports and personalizes with
numpy and one runtime's inference build, torch never needed. Runs only the
bundles its state trusts (``trust``: pinned keys, revocations, rollback), and
keeps the user's samples safe through damage, full disks, kills and
concurrent processes (``store``). Reads bundles through ``edgetailor.toolkit``
and nothing else of edgetailor.
"""

from edgetailor.device.runtime import DeviceRuntime, Prediction

__all__ = ["DeviceRuntime", "Prediction"]
