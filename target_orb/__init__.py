"""target-orb: Segment Track events to Orb usage events."""
