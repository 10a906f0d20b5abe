"""A small company website generated from a seed: a product catalogue and a staff directory.

Pure data and pure rendering (`generate_site(seed)`, `render(site, path, query)`); `server.py` serves it.
Pages: `/` (index) -> `/catalogue` -> `/catalogue/<category>` -> `/catalogue/<category>/<item>`,
`/staff` -> `/staff/<department>` -> `/staff/<department>/<employee>`, and `/search?q=...` (a form that
matches item names, SKUs and employee names). Facts that questions ask about (price, SKU, stock, join
date) appear only on the leaf pages, so answering needs real navigation.
"""

from __future__ import annotations

import html
import random
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from urllib.parse import quote

_ADJECTIVES = [
    "Amber",
    "Brisk",
    "Cobalt",
    "Dusky",
    "Ember",
    "Frosted",
    "Golden",
    "Hollow",
    "Ivory",
    "Jade",
    "Kindred",
    "Lunar",
    "Misty",
    "Noble",
    "Opal",
    "Polar",
    "Quiet",
    "Rustic",
    "Silver",
    "Tidal",
    "Umber",
    "Velvet",
    "Woven",
    "Zephyr",
]
_NOUNS = [
    "Lantern",
    "Kettle",
    "Compass",
    "Satchel",
    "Teapot",
    "Blanket",
    "Notebook",
    "Candle",
    "Bowl",
    "Clock",
    "Mirror",
    "Basket",
    "Scarf",
    "Pillow",
    "Vase",
    "Ladle",
    "Whistle",
    "Thermos",
    "Easel",
    "Hammock",
    "Trowel",
    "Spindle",
    "Quill",
    "Telescope",
]
_CATEGORIES = ["Kitchen", "Garden", "Outdoor", "Stationery", "Home Decor", "Textiles", "Tools", "Travel"]
_DEPARTMENTS = ["Engineering", "Marketing", "Finance", "Logistics", "Support", "Design", "Legal"]
_FIRST = [
    "Ada",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elif",
    "Farah",
    "Goran",
    "Hana",
    "Ines",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
    "Zoltan",
]
_LAST = [
    "Abara",
    "Bergstrom",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fontaine",
    "Gallo",
    "Haddad",
    "Ibsen",
    "Jovanovic",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quispe",
    "Rossi",
    "Sato",
    "Tanaka",
    "Uribe",
    "Varga",
    "Weber",
    "Yilmaz",
    "Zhou",
]
_OFFICES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Quito", "Tallinn", "Dublin", "Hanoi"]
_TITLES = ["Associate", "Specialist", "Senior Specialist", "Lead", "Manager", "Director"]


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Item:
    name: str
    sku: str
    price_cents: int
    in_stock: int
    category: str

    @property
    def price(self) -> str:
        return f"{self.price_cents // 100}.{self.price_cents % 100:02d}"


@dataclass(frozen=True)
class Employee:
    name: str
    title: str
    joined: date
    office: str
    department: str


@dataclass
class Site:
    seed: int
    name: str
    categories: dict[str, list[Item]] = field(default_factory=dict)
    departments: dict[str, list[Employee]] = field(default_factory=dict)

    def items(self) -> list[Item]:
        return [item for items in self.categories.values() for item in items]

    def employees(self) -> list[Employee]:
        return [e for staff in self.departments.values() for e in staff]


def generate_site(
    seed: int,
    n_categories: int = 4,
    items_per_category: int = 5,
    n_departments: int = 3,
    staff_per_department: int = 5,
) -> Site:
    """A deterministic site for `seed`: unique item and employee names, unique join dates."""
    rng = random.Random(f"company-site-{seed}")
    site = Site(seed=seed, name=f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} Trading Co.")
    names = rng.sample([f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS], n_categories * items_per_category)
    skus = rng.sample(range(1000, 10000), n_categories * items_per_category)
    for c, category in enumerate(rng.sample(_CATEGORIES, n_categories)):
        site.categories[category] = [
            Item(
                name=names[c * items_per_category + i],
                sku=f"{category[:2].upper()}-{skus[c * items_per_category + i]}",
                price_cents=rng.randrange(199, 25000),
                in_stock=rng.choice([0, 0, rng.randrange(1, 60)]),
                category=category,
            )
            for i in range(items_per_category)
        ]
    people = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], n_departments * staff_per_department)
    days = rng.sample(
        range(6000), n_departments * staff_per_department
    )  # unique: "who joined first" is exact
    for d, department in enumerate(rng.sample(_DEPARTMENTS, n_departments)):
        site.departments[department] = [
            Employee(
                name=people[d * staff_per_department + i],
                title=rng.choice(_TITLES),
                joined=date(2008, 1, 1) + timedelta(days=days[d * staff_per_department + i]),
                office=rng.choice(_OFFICES),
                department=department,
            )
            for i in range(staff_per_department)
        ]
    return site


# ----------------------------------------------------------------------------- rendering


def _page(title: str, body: str, crumbs: list[tuple[str, str]] | None = None) -> str:
    nav = " &gt; ".join(f'<a href="{href}">{html.escape(text)}</a>' for text, href in (crumbs or []))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:50em}td,th{padding:.2em 1em}</style>"
        f"</head><body><nav>{nav}</nav><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def _links(entries: list[tuple[str, str]]) -> str:
    return (
        "<ul>"
        + "".join(f'<li><a href="{href}">{html.escape(text)}</a></li>' for text, href in entries)
        + "</ul>"
    )


def _search_form(query: str = "") -> str:
    return (
        '<form action="/search" method="get"><label for="q">Search items, SKUs and staff: </label>'
        f'<input id="q" name="q" type="text" value="{html.escape(query, quote=True)}">'
        '<button type="submit">Search</button></form>'
    )


def item_url(item: Item) -> str:
    return f"/catalogue/{slugify(item.category)}/{slugify(item.name)}"


def employee_url(employee: Employee) -> str:
    return f"/staff/{slugify(employee.department)}/{slugify(employee.name)}"


def render(site: Site, path: str, query: dict[str, str] | None = None) -> tuple[int, str]:
    """(HTTP status, HTML) of a page; unknown paths give a 404 page that links home."""
    query = query or {}
    home = [("Home", "/")]
    parts = [p for p in path.split("/") if p]
    categories = {slugify(c): c for c in site.categories}
    departments = {slugify(d): d for d in site.departments}
    if not parts:
        body = f"<p>Welcome to {html.escape(site.name)}.</p>" + _links(
            [("Product catalogue", "/catalogue"), ("Staff directory", "/staff"), ("Search", "/search")]
        )
        return 200, _page(site.name, body)
    if parts[0] == "search" and len(parts) == 1:
        q = query.get("q", "").strip()
        body = _search_form(q)
        if q:
            needle = q.lower()
            hits = [
                (f"{i.name} ({i.sku})", item_url(i))
                for i in site.items()
                if needle in i.name.lower() or needle in i.sku.lower()
            ]
            hits += [(e.name, employee_url(e)) for e in site.employees() if needle in e.name.lower()]
            body += f"<p>{len(hits)} result(s) for &quot;{html.escape(q)}&quot;</p>" + (
                _links(hits) if hits else ""
            )
        return 200, _page("Search", body, home)
    if parts[0] == "catalogue":
        crumbs = home + [("Catalogue", "/catalogue")]
        if len(parts) == 1:
            entries = [(c, f"/catalogue/{slugify(c)}") for c in site.categories]
            return 200, _page("Product catalogue", _links(entries), home)
        category = categories.get(parts[1])
        if category is not None and len(parts) == 2:
            entries = [(i.name, item_url(i)) for i in site.categories[category]]
            return 200, _page(f"Category: {category}", _links(entries), crumbs)
        if category is not None and len(parts) == 3:
            for item in site.categories[category]:
                if slugify(item.name) == parts[2]:
                    stock = f"{item.in_stock} in stock" if item.in_stock else "Out of stock"
                    body = (
                        "<table>"
                        f"<tr><th>SKU</th><td>{item.sku}</td></tr>"
                        f"<tr><th>Price</th><td>${item.price}</td></tr>"
                        f"<tr><th>Availability</th><td>{stock}</td></tr>"
                        f"<tr><th>Category</th><td>{html.escape(category)}</td></tr>"
                        "</table>"
                    )
                    crumbs = crumbs + [(category, f"/catalogue/{parts[1]}")]
                    return 200, _page(item.name, body, crumbs)
    if parts[0] == "staff":
        crumbs = home + [("Staff", "/staff")]
        if len(parts) == 1:
            entries = [(d, f"/staff/{slugify(d)}") for d in site.departments]
            return 200, _page("Staff directory", _links(entries), home)
        department = departments.get(parts[1])
        if department is not None and len(parts) == 2:
            entries = [(e.name, employee_url(e)) for e in site.departments[department]]
            return 200, _page(f"Department: {department}", _links(entries), crumbs)
        if department is not None and len(parts) == 3:
            for employee in site.departments[department]:
                if slugify(employee.name) == parts[2]:
                    body = (
                        "<table>"
                        f"<tr><th>Title</th><td>{html.escape(employee.title)}</td></tr>"
                        f"<tr><th>Department</th><td>{html.escape(department)}</td></tr>"
                        f"<tr><th>Office</th><td>{html.escape(employee.office)}</td></tr>"
                        f"<tr><th>Joined</th><td>{employee.joined.isoformat()}</td></tr>"
                        "</table>"
                    )
                    crumbs = crumbs + [(department, f"/staff/{parts[1]}")]
                    return 200, _page(employee.name, body, crumbs)
    return 404, _page("Page not found", f"<p>No page at {html.escape(quote(path))}.</p>", home)
