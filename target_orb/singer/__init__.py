"""The Singer side.

The SDK seam (the only module touching singer-sdk private names) and the message reader.
"""
