"""`load_method: upsert`: decide each key, then ingest, amend or deprecate in Orb."""
