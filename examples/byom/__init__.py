"""Bring your own model: user architectures and the walkthrough of docs/BRING_YOUR_OWN_MODEL.md."""
