"""Export: turn trained models into signed-off device bundles (``export_bundle``):
GE as ONNX for inference, LE and GN as ONNX Runtime on-device training
artifacts, a manifest with every file's sha256. Needs torch and onnx.
"""
