"""Customers on the stand-in: GET/PUT /v1/customers/external_customer_id/{id}."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
import requests

from fake_orb import FakeOrb

from .conftest import NOW, Api, error_type, ts

AWKWARD = ["en/cus/?1500", "a b", "ünï#cødé", "100%", "x+y&z=1"]


def path(ext: str) -> str:
    return "/customers/external_customer_id/" + quote(ext, safe="")


def test_seeded_customer_is_a_customer_object(orb: FakeOrb, api: Api) -> None:
    seeded = orb.add_customer("acct_1", {"plan": "pro"})
    resp = api.get(path("acct_1"))
    assert resp.status_code == 200
    body = resp.json()
    assert body == seeded == orb.customer("acct_1")
    assert body["id"] == "fake_cus_1"
    assert body["external_customer_id"] == "acct_1"
    assert body["metadata"] == {"plan": "pro"}
    assert body["created_at"] == ts(NOW)
    # Every field Orb's spec requires on a Customer is there.
    for name in (
        "metadata", "id", "external_customer_id", "name", "email", "timezone",
        "payment_provider_id", "payment_provider", "created_at", "shipping_address",
        "billing_address", "balance", "currency", "tax_id", "auto_collection",
        "exempt_from_automated_tax", "email_delivery", "auto_issuance", "additional_emails",
        "portal_url", "hierarchy",
    ):  # fmt: skip
        assert name in body, name
    with pytest.raises(ValueError):
        orb.add_customer("acct_1")
    with pytest.raises(ValueError):
        orb.add_customer("acct_2", {"n": 1})  # type: ignore[dict-item]


def test_unknown_customer_is_resource_not_found(orb: FakeOrb, api: Api) -> None:
    for resp in (api.get(path("ghost")), api.put(path("ghost"), {"metadata": {"a": "1"}})):
        assert resp.status_code == 404
        assert error_type(resp) == "404-resource-not-found"
        assert "ghost" in resp.json()["detail"]
    assert orb.customer("ghost") is None
    assert [u["status"] for u in orb.customer_updates()] == [404]


def test_metadata_semantics(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1", {"keep": "1", "drop": "2"})
    resp = api.put(path("acct_1"), {"metadata": {"new": "true", "drop": None, "keep": "3"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["metadata"] == {"keep": "3", "new": "true"}
    assert orb.customer("acct_1")["metadata"] == {"keep": "3", "new": "true"}
    # Other fields leave metadata alone; metadata: null clears it all.
    assert api.put(path("acct_1"), {"name": "Acme"}).json()["metadata"] == {
        "keep": "3",
        "new": "true",
    }
    assert orb.customer("acct_1")["name"] == "Acme"
    assert api.put(path("acct_1"), {"metadata": None}).json()["metadata"] == {}
    assert [u["body"] for u in orb.customer_updates()] == [
        {"metadata": {"new": "true", "drop": None, "keep": "3"}},
        {"name": "Acme"},
        {"metadata": None},
    ]
    assert [u["external_customer_id"] for u in orb.customer_updates()] == ["acct_1"] * 3


@pytest.mark.parametrize("ext", AWKWARD)
def test_ids_are_url_decoded(orb: FakeOrb, api: Api, ext: str) -> None:
    orb.add_customer(ext)
    resp = api.put(path(ext), {"metadata": {"k": "v"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["external_customer_id"] == ext
    assert api.get(path(ext)).json()["metadata"] == {"k": "v"}


def test_an_unencoded_slash_is_not_a_customer_path(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("en/cus")
    resp = api.get("/customers/external_customer_id/en/cus")
    assert resp.status_code == 404
    assert error_type(resp) == "404-url-not-found"


@pytest.mark.parametrize(
    "body",
    [
        {"metadata": {"n": 1}},
        {"metadata": {"b": True}},
        {"metadata": {"nested": {"a": "b"}}},
        {"metadata": ["a"]},
        {"metadata": "a=b"},
        {"traits": {"a": "b"}},
        {"email": "not-an-email"},
        {"payment_provider": "paypal"},
        {"auto_collection": "yes"},
        [],
    ],
)
def test_strict_edit_customer_validation(orb: FakeOrb, api: Api, body: Any) -> None:
    orb.add_customer("acct_1", {"a": "1"})
    resp = api.put(path("acct_1"), body)
    assert resp.status_code == 400, resp.text
    assert error_type(resp) == "400-request-validation-errors"
    assert orb.customer("acct_1")["metadata"] == {"a": "1"}


def test_immutable_fields(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    resp = api.put(path("acct_1"), {"external_customer_id": "other"})
    assert resp.status_code == 400
    assert error_type(resp) == "400-constraint-violation"
    assert api.put(path("acct_1"), {"external_customer_id": "acct_1"}).status_code == 200
    assert api.put(path("acct_1"), {"currency": "USD"}).json()["currency"] == "USD"
    assert api.put(path("acct_1"), {"currency": "EUR"}).status_code == 400
    assert api.put(path("acct_1"), {"email": "billing@example.com"}).status_code == 200


def test_request_shape_and_auth(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    resp = api.put(path("acct_1"), data="{}", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 400
    assert api.get(path("acct_1"), params={"expand": "x"}).status_code == 400
    assert requests.get(orb.url + path("acct_1"), timeout=5).status_code == 401
    assert api.post(path("acct_1"), {}).status_code == 404  # GET and PUT only
    # Orb honours Idempotency-Key on POST/PATCH only: a PUT is processed every time.
    hdr = {"Idempotency-Key": "put-1"}
    first = api.put(path("acct_1"), {"metadata": {"a": "1"}}, headers=hdr)
    again = api.put(path("acct_1"), {"metadata": {"a": "2"}}, headers=hdr)
    assert first.status_code == again.status_code == 200
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["metadata"]["a"] == "2"
    assert len(orb.customer_updates()) == 2


def test_control_api_for_customers(orb: FakeOrb, api: Api) -> None:
    ctl = orb.root_url + "/_fake"
    with requests.Session() as plain:
        made = plain.post(
            f"{ctl}/customers",
            json={"external_customer_id": "en/cus/?1", "metadata": {"tier": "gold"}},
            timeout=5,
        )
        assert made.status_code == 200, made.text
        assert api.put(path("en/cus/?1"), {"metadata": {"seen": "yes"}}).ok
        one = plain.get(f"{ctl}/customers/" + quote("en/cus/?1", safe=""), timeout=5).json()
        assert one["metadata"] == {"tier": "gold", "seen": "yes"}
        assert [
            c["external_customer_id"] for c in plain.get(f"{ctl}/customers", timeout=5).json()
        ] == ["en/cus/?1"]
        updates = plain.get(f"{ctl}/customer_updates", timeout=5).json()
        assert updates == [
            {
                "external_customer_id": "en/cus/?1",
                "body": {"metadata": {"seen": "yes"}},
                "status": 200,
            }
        ]
        assert plain.post(f"{ctl}/customers", json={"id": "x"}, timeout=5).status_code == 400
        assert plain.get(f"{ctl}/customers/nobody", timeout=5).status_code == 404
        # reset forgets updates and restores the seeded metadata
        assert plain.post(f"{ctl}/reset", timeout=5).ok
        assert orb.customer("en/cus/?1")["metadata"] == {"tier": "gold"}
        assert orb.customer_updates() == []
