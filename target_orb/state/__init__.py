"""target-orb's own store at `state_url` (the ledger) and the digests kept in it."""
