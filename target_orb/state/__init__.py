"""target-orb's store at `state_url`: `schema` (tables and version), `ledger` (the engine
and what Orb acknowledged), `backfills` (the backfills each job created), `deadletters`
(`dead_letter_target: state`), and the body digests (`digests`)."""
