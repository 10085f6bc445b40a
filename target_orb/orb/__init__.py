"""Talking to Orb.

The HTTP client, what Orb's answers mean, rate limits, search, delivery with retries.
"""
