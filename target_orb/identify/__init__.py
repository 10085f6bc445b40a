"""`identify_policy: customer_metadata`: Identify records become Orb customer metadata updates."""
