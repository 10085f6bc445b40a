"""`late_event_policy: backfill`: windows, the ownership record, and the backfill manager.

How history is loaded (README "Loading history"; Orb API reference: event backfills, event search):

- **Windows.** A late event belongs to the calendar month (UTC) of its timestamp:
  `[YYYY-MM-01T00:00:00Z, first of next month)`, at most 31 whole UTC days, so every rerun
  makes the same windows for every month wholly past the grace boundary.
- **The grace boundary.** Orb accepts a backfill whose timeframe ends after now - grace
  period only with a `deprecation_filter` (orb-billing 4.90 `events/backfills.py`, create:
  "When `deprecation_filter` is provided, the timeframe may extend to `now` rather than the
  event reporting grace boundary"); target-orb never sets one. So a backfill's
  `timeframe_end` is the window's end or `boundary()` at the create (now - grace -
  `SKEW_MARGIN` for the clocks of this machine and Orb, whole seconds), whichever is first:
  the open month's backfill ends at the boundary. An event newer than the current
  backfill's end waits until the boundary has passed it (at most `SKEW_MARGIN` plus the
  clock difference; bounded by `max_retry_seconds`), then the window continues in a new
  backfill reaching past it. Events are late (mapping.track.backfill_threshold) exactly
  when they are older than now - grace: newer ones go live, and one Orb's live ingest
  refuses as too old comes here.
- **Create.** `POST /v1/events/backfills` with `replace_existing_events: false` sent
  explicitly (Orb's default is `true`, which would replace every customer's events in the
  timeframe), an explicit `close_time` (creation + 24 h, Orb's own default made explicit),
  and no customer scope (not needed: a non-replacing backfill only adds). When Orb refuses a
  create because of a pending backfill target-orb owns (this run's, for another window or an
  earlier timeframe, or one the ownership record names), target-orb closes it, waits until
  Orb reflected it and creates the next; after one such refusal for a backfill that does not
  overlap, the run keeps at most one backfill pending at a time (Orb's support pages: a new
  backfill cannot be created while another is still being reflected). The request carries
  `Idempotency-Key: target-orb-backfill-<sha256 of the payload, the window's create count
  and the job_name>`: a retried create (timeout, 5xx, 409) sends the same payload and key, so Orb
  replays the first answer instead of making a second backfill; a later create (a later run,
  or a window whose backfill Orb closed) has a new close time or count, hence a new key, and
  never replays an old, closed backfill.
- **Ownership record.** Orb keeps no label on a backfill, so target-orb writes what it
  creates to its store at `state_url` (table `target_orb_backfills`, one row per create,
  naming the `job_name`; `ownership.StoreOwnershipRecord`), committed: the create's payload
  and key *before* the request, the backfill id once Orb answered, `closed` once closed. A
  `….backfills.json` an earlier release kept beside the dead-letter file is imported once. A
  pending backfill overlapping a window is this job's when its id is in one of the job's rows,
  or when it matches an unanswered create of the job (same timeframe and the same
  `close_time`, to the second): a killed run's, closed and continued whatever disk the rerun
  starts on. One another job sharing the store created is waited for until Orb reflected it
  (the waiting job first closes its own pending backfills, so two jobs never wait on each
  other), never written into or closed. Any other pending backfill (another tool's, a
  person's) stops the run before anything of that window is sent, naming it, its close time
  and what to do; target-orb never writes into it.
- **Before ingesting** a batch into a window's backfill, keys target-orb itself delivered
  (live or backfill; kept in the store at `state_url`, because search does not see amended
  events) are left out and counted "already delivered"; then `POST /v1/events/search` (500
  ids a call, the window as timeframe) says which other keys Orb already holds; those are
  left out and counted "already in Orb".
- **Issued invoices.** Orb does not change or re-issue an issued invoice when a backfill
  closes (Orb's support pages on backfills: a closed backfill updates draft invoices only).
  Before a window is loaded, `GET /v1/invoices` (statuses issued, paid, synced; invoice date
  from the window's start; every page) says which customers have an issued invoice whose
  line items' service period overlaps the window; their events in that period follow
  `issued_period_policy` (`backfill`: loaded and reported; `dead_letter`: dead-lettered with
  the invoice named; `fail`: the run stops), and the summary counts them per customer and
  window.
- **Pending backfills are invisible to search**, so keys this run put into its own backfills
  are remembered in memory, and a pending backfill left by a killed run is never written into
  again: the rerun closes it (its events are then billed once), waits until Orb reflects it,
  and only then searches and loads the rest of the window through a new backfill. Each
  backfill ingest request also carries a deterministic `Idempotency-Key` (backfill id +
  body), so a retried request is a replay, not a second copy.
- **Close.** Every backfill a run created is closed before the run exits: at the end of the
  input, and on failure and SIGTERM/SIGINT paths too (`Runtime.finish_backfills`, runtime.py). A run
  killed outright leaves it pending until its `close_time`; the next run closes it.
- **STATE** moves past a late event once it is ingested into a backfill (Orb reflects it at
  close or at `close_time`, so it is not lost), found already in Orb, or dead-lettered: the
  loads run as pipeline jobs (`Pipeline.submit_job`).
- **Boundary events.** An event Orb's live `/ingest` rejects as too old is loaded through a
  backfill (once the boundary has passed it), not dead-lettered.
"""
