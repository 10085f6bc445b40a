"""Pure record → Orb event.

Fields, properties, timestamps, the track mapping and traits → metadata.
"""
