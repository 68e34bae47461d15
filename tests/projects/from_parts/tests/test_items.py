"""Each test writes one item and must see only its own: with a shared database they would pile up."""

import pytest


@pytest.mark.parametrize("n", range(8))
def test_an_item_of_its_own(client, n):
    created = client.post("/items", json={"title": f"item {n}"})
    assert created.status_code == 201, created.text
    listed = client.get("/items").json()
    assert listed == {"count": 1, "titles": [f"item {n}"]}


def test_the_lifespan_ran(client):
    assert client.get("/health").json() == {"started": True, "greeting": "ready"}
