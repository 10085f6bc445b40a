"""Pure correction decisions: digests, what to do per key, and Orb's refusal reasons."""

from __future__ import annotations

import decimal

import pytest

from target_orb.corrections.decisions import Action, decide, orb_body, refusal_reason
from target_orb.orb.answers import is_not_found, refusal_code
from target_orb.state.digests import Known, amendment_body, body_digest

EVENT = {
    "idempotency_key": "k1",
    "event_name": "api",
    "external_customer_id": "c1",
    "timestamp": "2026-01-02T03:04:05Z",
    "properties": {"tokens": 5, "region": "eu"},
}
BODY = amendment_body(EVENT)


def _known(body=BODY, **kw) -> Known:
    return Known(body=body, digest=body_digest(body), **kw)


def test_amendment_body_is_exactly_the_amended_event_fields():
    assert BODY == {"event_name": "api", "timestamp": "2026-01-02T03:04:05Z",
                    "properties": {"tokens": 5, "region": "eu"}, "external_customer_id": "c1"}
    assert "idempotency_key" not in BODY


def test_digest_ignores_key_order_and_number_spelling_but_not_types():
    same = {**BODY, "properties": {"region": "eu", "tokens": decimal.Decimal("5.00")}}
    assert body_digest(same) == body_digest(BODY)
    assert body_digest({**BODY, "properties": {"region": "eu", "tokens": 5.0}}) == body_digest(BODY)
    assert body_digest({**BODY, "properties": {"region": "eu", "tokens": "5"}}) != body_digest(BODY)
    assert body_digest({**BODY, "properties": {"region": "eu", "tokens": 6}}) != body_digest(BODY)
    assert body_digest({**BODY, "properties": {"region": "eu", "tokens": True}}) != body_digest(
        {**BODY, "properties": {"region": "eu", "tokens": 1}})


def test_orb_search_event_compares_equal_to_the_event_target_orb_sent():
    found = {"id": "k1", "customer_id": "orb_cus_1", "external_customer_id": "c1",
             "event_name": "api", "timestamp": "2026-01-02T03:04:05+00:00",
             "properties": {"tokens": 5.0, "region": "eu"}, "deprecated": False}
    assert body_digest(orb_body(found, "external_customer_id")) == body_digest(BODY)
    by_orb_id = orb_body(found, "customer_id")
    assert by_orb_id["customer_id"] == "orb_cus_1" and "external_customer_id" not in by_orb_id


@pytest.mark.parametrize(
    ("new", "deleted", "known", "action"),
    [
        (BODY, False, None, Action.INGEST),
        (BODY, False, _known(), Action.UNCHANGED),
        ({**BODY, "properties": {"tokens": 4}}, False, _known(), Action.AMEND),
        # a changed timestamp or customer is sent as an amendment for Orb to judge
        ({**BODY, "timestamp": "2026-01-02T03:04:06Z"}, False, _known(), Action.AMEND),
        (BODY, False, _known(amended=True, source="ledger"), Action.UNCHANGED),
        (BODY, False, _known(deprecated=True), Action.DEPRECATED_IN_ORB),
        (BODY, True, _known(), Action.DEPRECATE),
        (BODY, True, None, Action.DEPRECATE),  # amended events are invisible to search
        (None, True, None, Action.DEPRECATE),
        (BODY, True, _known(deprecated=True), Action.ALREADY_DEPRECATED),
        # an ingest whose answer was never recorded: same body → re-ingest is harmless
        (BODY, False, Known(None, None, pending_op="ingest", pending_digest=body_digest(BODY)),
         Action.INGEST),
        ({**BODY, "properties": {"tokens": 7}}, False,
         Known(None, None, pending_op="ingest", pending_digest=body_digest(BODY)),
         Action.AMEND_OR_INGEST),
        # an amendment whose answer was never recorded: amend again (idempotent)
        (BODY, False, _known(pending_op="amend", pending_digest="x"), Action.AMEND),
        (BODY, True, _known(deprecated=True, pending_op="deprecate"), Action.DEPRECATE),
    ],
)
def test_decide(new, deleted, known, action):
    assert decide(new, deleted=deleted, known=known).action is action


ORB_MESSAGES = [
    (400, "The timestamp of the new event must match the timestamp of the existing event",
     "timestamp_changed"),
    (400, "We do not allow updating the Customer an event is associated with; customer_id "
          "must match the original", "customer_changed"),
    (400, "Customer with external_customer_id c9 not found", "unknown_customer"),
    (404, "Customer not found", "unknown_customer"),
    (400, "Event timestamp must fall within the customer's current billing period or the "
          "grace period of the previous one", "closed_period"),
    (400, "Cannot deprecate events in billing periods that have already invoiced customers",
     "closed_period"),
    (400, "No more than 100 events can be amended for a single customer in a 100 day period",
     "amendment_cap"),
    (404, "Event k1 not found", "event_not_found"),
    (400, "something new", "other"),
]


@pytest.mark.parametrize(("status", "detail", "code"), ORB_MESSAGES)
def test_refusal_code_reads_orb_prose(status, detail, code):
    body = {"status": status, "title": "Bad", "detail": detail,
            "type": "https://docs.withorb.com/reference/error-responses#400-request-validation-error"}
    assert refusal_code(status, body) == code


@pytest.mark.parametrize("code", ["timestamp_changed", "customer_changed", "unknown_customer",
                                  "closed_period", "amendment_cap", "event_not_found", "other"])
def test_every_refusal_reason_names_the_code_the_key_and_what_orb_said(code):
    new = {**BODY, "timestamp": "2026-01-02T03:04:06Z"}
    reason = refusal_reason(code, op="amend", key="k1", stored=BODY, new=new, status=400,
                            body={"detail": "orb words"})
    assert f"({code})" in reason and "orb words" in reason
    assert reason.startswith("Orb refused the correction")


def test_closed_period_reason_says_credit_note_or_backfill():
    reason = refusal_reason("closed_period", op="deprecate", key="k1", stored=BODY, new=None,
                            status=400, body={"detail": "invoiced"})
    assert "needs a credit note or an Orb backfill" in reason


def test_timestamp_reason_shows_both_times():
    new = {**BODY, "timestamp": "2026-02-01T00:00:00Z"}
    reason = refusal_reason("timestamp_changed", op="amend", key="k1", stored=BODY, new=new,
                            status=400, body={})
    assert "2026-01-02T03:04:05Z" in reason and "2026-02-01T00:00:00Z" in reason
    assert "new idempotency key" in reason


def test_not_found_is_about_the_event_not_the_url_or_customer():
    assert is_not_found(404, {"type": "…#404-resource-not-found", "detail": "Event not found"})
    assert not is_not_found(404, {"type": "…#404-url-not-found", "title": "URL not found"})
    assert not is_not_found(404, {"type": "…#404-resource-not-found",
                                  "detail": "Customer not found"})
    assert not is_not_found(400, {"detail": "timestamp must match"})


def test_correction_settings_are_declared_with_orb_meanings():
    from target_orb.config_checks import config_problems
    from target_orb.target import TargetOrb

    schema = TargetOrb.config_jsonschema["properties"]
    method = schema["load_method"]
    assert method["default"] == "append-only"
    assert method["enum"] == ["append-only", "upsert", "overwrite"]
    assert "amended" in method["description"] and "refused" in method["description"]
    assert schema["ledger_url"].get("secret") is True  # a PostgreSQL URL may hold a password
    assert schema["deprecate_deleted_events"]["default"] is False
    for name in ("load_method", "ledger_url", "deprecate_deleted_events"):
        assert schema[name].get("title") and schema[name].get("description"), name
    base = {"api_key": "k", "external_customer_id_field": "userId"}
    assert config_problems({**base, "load_method": "upsert"}) == []
    [problem] = config_problems({**base, "load_method": "overwrite"})
    assert "replacing backfill" in problem and "upsert" in problem
