"""Browser tasks: questions answered only by navigating the generated company site (`envs/sites/company.py`).

Each task's site is generated from its seed, so the task id regenerates both the question and the site.
The answer is computed on the host from the generated data and graded by exact match (after
`normalize_answer`); the agent reads it off leaf pages it has to reach by clicking or searching.

Kinds:
- `item_price`: the price of a named item in a named category (index -> catalogue -> category -> item).
- `earliest_joiner`: which employee of a department joined first (every employee page of the department).
- `sku_lookup`: which item has a given SKU (the search form, or every item page).
- `out_of_stock_count`: how many items of a category are out of stock (every item page of the category).
- `employee_office`: the office city of a named employee (search the name, open the result).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from m2rl.envs.sites.company import Site, generate_site
from m2rl.envs.tasks.base import Task, TaskSet

SYSTEM_PROMPT = (
    "You are a web research agent. You have a `browser` tool that can reach only one local company website; "
    "every action returns the page as text with numbered links. Navigate the site to find the answer, then "
    "call `submit` with the answer exactly in the requested format."
)


@dataclass(frozen=True)
class SiteParams:
    """Size of the generated site (part of the task family: changing it changes every task)."""

    n_categories: int = 4
    items_per_category: int = 5
    n_departments: int = 3
    staff_per_department: int = 5


def site_for(seed: int, params: SiteParams) -> Site:
    return generate_site(seed, **asdict(params))


class BrowserTaskSet(TaskSet):
    family = "browser"
    kinds = ("item_price", "earliest_joiner", "sku_lookup", "out_of_stock_count", "employee_office")
    system_prompt = SYSTEM_PROMPT

    def __init__(self, params: SiteParams | None = None) -> None:
        self.params = params or SiteParams()

    def generate(self, kind: str, seed: int) -> Task:
        if kind not in self.kinds:
            raise KeyError(f"unknown browser task kind {kind!r}; known: {list(self.kinds)}")
        site = site_for(seed, self.params)
        rng = random.Random(f"browser-task-{kind}-{seed}")
        meta: dict[str, object] = {"site_seed": seed, "site_params": asdict(self.params)}
        start = "Start by opening '/' with the browser tool."
        if kind == "item_price":
            item = rng.choice(site.items())
            prompt = (
                f"On the company website, what is the price of the product '{item.name}' in the "
                f"{item.category} category? Answer with the number only, without the currency sign "
                f"(for example 12.50). {start}"
            )
            answer = item.price
            meta.update(category=item.category, item=item.name)
        elif kind == "earliest_joiner":
            department = rng.choice(list(site.departments))
            first = min(site.departments[department], key=lambda e: e.joined)
            prompt = (
                f"On the company website's staff directory, which employee of the {department} department "
                f"joined the company first? Answer with the employee's full name. {start}"
            )
            answer = first.name
            meta.update(department=department)
        elif kind == "sku_lookup":
            item = rng.choice(site.items())
            prompt = (
                f"Which product on the company website has the SKU {item.sku}? Answer with the product's "
                f"name exactly as shown on its page. The site has a search form. {start}"
            )
            answer = item.name
            meta.update(sku=item.sku)
        elif kind == "out_of_stock_count":
            category = rng.choice(list(site.categories))
            answer = str(sum(1 for item in site.categories[category] if item.in_stock == 0))
            prompt = (
                f"How many products in the {category} category of the company website are out of stock? "
                f"Answer with a number. {start}"
            )
            meta.update(category=category)
        else:  # employee_office
            employee = rng.choice(site.employees())
            prompt = (
                f"In which office city does {employee.name} work, according to the company website's "
                f"staff pages? Answer with the city name. {start}"
            )
            answer = employee.office
            meta.update(employee=employee.name)
        return self.make_task(kind, seed, prompt, answer=answer, meta=meta)

    def site(self, task: Task) -> Site:
        """The site a task is asked about (regenerated from its seed)."""
        return site_for(int(task.meta["site_seed"]), SiteParams(**task.meta["site_params"]))
