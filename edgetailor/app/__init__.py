"""The top layer, the only place where the sides meet: the ``edgetailor``
command line, the end-to-end demo, and the workflows that need the server,
export and device sides together (compressing a GE and measuring it on the
device runtime; expanding a learngene to fit a device profile). Nothing below
imports from here.
"""
