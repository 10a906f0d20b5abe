"""The generated company site, its HTTP server and the browser task set (pure parts: no Chromium)."""

from __future__ import annotations

import html
import re
import threading
import urllib.error
import urllib.request

import pytest
from m2rl.envs.sites.company import employee_url, generate_site, item_url, render, slugify
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tasks.base import normalize_answer, split_of
from m2rl.envs.tasks.browser_tasks import BrowserTaskSet


def cell(page: str, header: str) -> str:
    """The value of a table row in rendered HTML (an independent reading of the page)."""
    match = re.search(rf"<tr><th>{re.escape(header)}</th><td>(.*?)</td></tr>", page)
    assert match is not None, f"no {header} row"
    return html.unescape(match.group(1))


def links(page: str) -> list[tuple[str, str]]:
    return [(html.unescape(t), h) for h, t in re.findall(r'<a href="([^"]+)">(.*?)</a>', page)]


def test_site_is_deterministic_and_names_are_unique() -> None:
    a, b, c = generate_site(7), generate_site(7), generate_site(8)
    assert a == b and a != c
    names = [i.name for i in a.items()]
    assert len(names) == len(set(names)) == 20
    skus = [i.sku for i in a.items()]
    assert len(set(skus)) == len(skus)
    for staff in a.departments.values():
        joined = [e.joined for e in staff]
        assert len(set(joined)) == len(joined)  # "who joined first" has one answer


def test_every_item_and_employee_is_reachable_by_links_from_the_index() -> None:
    site = generate_site(3)
    seen, frontier = set(), ["/"]
    while frontier:
        path = frontier.pop()
        if path in seen:
            continue
        seen.add(path)
        status, page = render(site, path.split("?")[0])
        assert status == 200, path
        frontier += [h for _, h in links(page) if h.startswith("/")]
    assert {item_url(i) for i in site.items()} <= seen
    assert {employee_url(e) for e in site.employees()} <= seen


def test_leaf_pages_show_the_generated_facts() -> None:
    site = generate_site(11)
    item = site.items()[5]
    status, page = render(site, item_url(item))
    assert status == 200
    assert cell(page, "SKU") == item.sku
    assert cell(page, "Price") == f"${item.price_cents / 100:.2f}"
    assert (cell(page, "Availability") == "Out of stock") == (item.in_stock == 0)
    employee = site.employees()[4]
    status, page = render(site, employee_url(employee))
    assert cell(page, "Joined") == employee.joined.isoformat()
    assert cell(page, "Office") == employee.office


def test_search_matches_names_and_skus_and_unknown_paths_are_404() -> None:
    site = generate_site(5)
    item = site.items()[2]
    _, page = render(site, "/search", {"q": item.sku.lower()})
    assert (f"{item.name} ({item.sku})", item_url(item)) in links(page)
    _, page = render(site, "/search", {"q": "zzzz-no-such"})
    assert "0 result(s)" in page
    for bad in ["/nope", "/catalogue/nope", "/catalogue/" + slugify(item.category) + "/nope", "/staff/x/y/z"]:
        status, page = render(site, bad)
        assert status == 404 and "Page not found" in page


def test_server_serves_pages_and_closes_its_thread_and_port() -> None:
    site = generate_site(2)
    before = set(threading.enumerate())
    server = SiteServer(lambda p, q: render(site, p, q))
    with urllib.request.urlopen(server.origin + "/catalogue", timeout=10) as resp:
        assert resp.status == 200 and "Product catalogue" in resp.read().decode()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.origin + "/missing", timeout=10)
    assert err.value.code == 404
    assert server.requests == ["/catalogue", "/missing"]
    server.close()
    server.close()  # idempotent
    assert set(threading.enumerate()) <= before
    with pytest.raises(OSError):
        urllib.request.urlopen(server.origin + "/", timeout=2)


def test_server_survives_a_render_error() -> None:
    def broken(path: str, query: dict[str, str]) -> tuple[int, str]:
        raise RuntimeError("bug")

    with SiteServer(broken) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.origin + "/", timeout=10)
        assert err.value.code == 500


def test_task_answers_match_the_rendered_site() -> None:
    """The hidden answer equals what the pages say (read from HTML, independently of the generator)."""
    tasks = BrowserTaskSet()
    for kind in tasks.kinds:
        for seed in tasks.seeds("test", 3):
            task = tasks.generate(kind, seed)
            site = tasks.site(task)
            meta = task.meta
            if kind == "item_price":
                item = next(i for i in site.items() if i.name == meta["item"])
                expected = cell(render(site, item_url(item))[1], "Price").lstrip("$")
            elif kind == "earliest_joiner":
                staff = site.departments[meta["department"]]
                expected = min(staff, key=lambda e: cell(render(site, employee_url(e))[1], "Joined")).name
            elif kind == "sku_lookup":
                hits = [
                    t for t, h in links(render(site, "/search", {"q": meta["sku"]})[1]) if h.count("/") == 3
                ]
                assert len(hits) == 1
                expected = hits[0].rsplit(" (", 1)[0]
            elif kind == "out_of_stock_count":
                pages = [render(site, item_url(i))[1] for i in site.categories[meta["category"]]]
                expected = str(sum(cell(p, "Availability") == "Out of stock" for p in pages))
            else:
                employee = next(e for e in site.employees() if e.name == meta["employee"])
                expected = cell(render(site, employee_url(employee))[1], "Office")
            assert normalize_answer(task.answer or "") == normalize_answer(expected), task.id


def test_task_ids_regenerate_tasks_and_splits_are_disjoint() -> None:
    tasks = BrowserTaskSet()
    train, test = set(tasks.seeds("train", 50)), set(tasks.seeds("test", 20))
    assert not train & test
    for seed in list(test)[:5]:
        task = tasks.generate("item_price", seed)
        assert task.split == "test" == split_of("browser", seed)
        assert tasks.get(task.id) == task
    with pytest.raises(KeyError):
        tasks.get("browser/no_such_kind/1")
