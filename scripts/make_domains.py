"""Write the built-in SOP domains (refunds, inventory, access) under data/domains/.

Seeded and deterministic: running it twice writes identical files. For every task the
scenario (which branch of the procedure applies) is decided first, then fixture rows
consistent with it are built and the expected answer is written from the scenario logic
here, independently of rl_core/environments/expert.py. The tests check that the expert,
playing each domain's declarative `procedure` against those fixtures, scores 1.0 on every
task: that is the proof the procedure, the fixtures and the expected answers agree.

Every entity (order, customer, sku, supplier, user, email) gets a fresh 4-digit id drawn
without replacement from one shuffled pool per domain, shared by both splits: the splits'
ids are disjoint (no held-out entity appears in training) yet come from the same
distribution, so a policy must copy ids from its context rather than recall them. Every task
gets rows for all tools it could call (even off its branch), so a mistaken branch still sees real
observations. Scenarios are balanced within each split.

Usage: python scripts/make_domains.py [--out DIR] [--train N] [--heldout N]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "domains"
SEED = 1729
ID_RANGE = (1000, 10000)
SPLIT_SIZES = {"train": 1000, "heldout": 60}

REGIONS = ["north", "south", "east", "west"]
TIERS = ["gold", "silver", "basic"]
TEAMS = ["sales", "ops", "eng", "finance"]
BENIGN_LOCKS = ["password", "mfa"]
RISKY_LOCKS = ["fraud", "policy"]


@dataclass
class Case:
    """One task's scenario made concrete: inputs, expected answer, and the fixture rows it needs."""

    prompt: str
    inputs: dict[str, str]
    expected: dict[str, str]
    rows: dict[str, list[dict[str, str]]]


class Ids:
    """Unique 4-digit ids (as strings) drawn without replacement from [low, high)."""

    def __init__(self, rng: random.Random, low: int, high: int):
        self._pool = [str(number) for number in range(low, high)]
        rng.shuffle(self._pool)

    def take(self) -> str:
        return self._pool.pop()


@dataclass
class DomainSpec:
    meta: dict[str, Any]
    scenarios: list[str]
    build: Callable[[str, Ids, random.Random], Case]


# --- declarative pieces of domain.json -------------------------------------------------


def tool(
    name: str, description: str, args: list[str], table: str, not_found: str, returns: list[str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {arg: {"type": "string"} for arg in args},
            "required": list(args),
            "additionalProperties": False,
        },
        "table": table,
        "key": list(args),
        "not_found": not_found,
    }
    if returns is not None:
        spec["returns"] = returns
    return spec


def call(name: str, args: dict[str, str], save_as: str) -> dict[str, Any]:
    return {"call": name, "args": args, "save_as": save_as}


def when(
    ref: str, op: str, value: Any, then: list[dict[str, Any]], otherwise: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    step: dict[str, Any] = {"if": {"ref": ref, "op": op, "value": value}, "then": then}
    if otherwise is not None:
        step["else"] = otherwise
    return step


def answer(**fields: str) -> dict[str, Any]:
    return {"answer": fields}


# --- refunds: order -> (cancelled | late -> deny) -> customer -> gold ? refund : credit ----

REFUNDS = {
    "name": "refunds",
    "description": "Decide a refund request from the order and the customer's tier.",
    "procedure_text": (
        "Get the order. If status is cancelled or days is over 30, answer deny with amount 0. "
        "Else get the customer of the order: gold tier gets refund, other tiers get credit, "
        "with the order amount."
    ),
    "tools": [
        tool(
            "get_order",
            "an order",
            ["order_id"],
            "orders",
            "order {order_id} not found",
            ["customer_id", "status", "days", "amount"],
        ),
        tool("get_customer", "a customer", ["customer_id"], "customers", "customer {customer_id} not found"),
    ],
    "procedure": [
        call("get_order", {"order_id": "$input.order_id"}, "order"),
        when("$order.status", "equals", "cancelled", [answer(decision="deny", amount="0")]),
        when("$order.days", "gte", "31", [answer(decision="deny", amount="0")]),
        call("get_customer", {"customer_id": "$order.customer_id"}, "customer"),
        when(
            "$customer.tier",
            "equals",
            "gold",
            [answer(decision="refund", amount="$order.amount")],
            [answer(decision="credit", amount="$order.amount")],
        ),
    ],
    "answer_fields": ["decision", "amount"],
}


def refunds_case(scenario: str, ids: Ids, rng: random.Random) -> Case:
    order_id, customer_id = ids.take(), ids.take()
    status = "cancelled" if scenario == "cancelled" else "delivered"
    if scenario == "cancelled":
        days = rng.randint(1, 60)
    else:
        days = rng.randint(31, 60) if scenario == "late" else rng.randint(1, 30)
    if scenario == "gold":
        tier = "gold"
    else:
        tier = rng.choice(["silver", "basic"]) if scenario == "standard" else rng.choice(TIERS)
    amount = str(rng.randint(20, 400))
    expected = {
        "cancelled": {"decision": "deny", "amount": "0"},
        "late": {"decision": "deny", "amount": "0"},
        "gold": {"decision": "refund", "amount": amount},
        "standard": {"decision": "credit", "amount": amount},
    }[scenario]
    return Case(
        prompt=f"Refund request for order {order_id}.",
        inputs={"order_id": order_id},
        expected=expected,
        rows={
            "orders": [
                {
                    "order_id": order_id,
                    "customer_id": customer_id,
                    "status": status,
                    "days": str(days),
                    "amount": amount,
                }
            ],
            "customers": [{"customer_id": customer_id, "tier": tier, "region": rng.choice(REGIONS)}],
        },
    )


# --- inventory: stock >= qty ? ship : supplier -> quote -> days <= 10 ? backorder : cancel --

INVENTORY = {
    "name": "inventory",
    "description": "Fill a stock request from the warehouse or a supplier backorder.",
    "procedure_text": (
        "Check stock of the sku at the warehouse. If on_hand >= qty: ship, source is the "
        "warehouse, cost 0. Else find the supplier of the sku and get a quote for qty. "
        "If days <= 10: backorder, source is the supplier_id, cost from the quote. "
        "Else: cancel, source none, cost 0."
    ),
    "tools": [
        tool(
            "check_stock", "stock at a warehouse", ["sku", "warehouse"], "stock", "sku {sku} not stocked at {warehouse}"
        ),
        tool("find_supplier", "supplier of a sku", ["sku"], "suppliers", "no supplier for sku {sku}"),
        tool(
            "get_quote",
            "cost and days for qty",
            ["supplier_id", "qty"],
            "quotes",
            "no quote from supplier {supplier_id} for qty {qty}",
            ["qty", "cost", "days"],
        ),
    ],
    "procedure": [
        call("check_stock", {"sku": "$input.sku", "warehouse": "$input.warehouse"}, "stock"),
        when("$stock.on_hand", "gte", "$input.qty", [answer(action="ship", source="$input.warehouse", cost="0")]),
        call("find_supplier", {"sku": "$input.sku"}, "supplier"),
        call("get_quote", {"supplier_id": "$supplier.supplier_id", "qty": "$input.qty"}, "quote"),
        when(
            "$quote.days",
            "lte",
            "10",
            [answer(action="backorder", source="$supplier.supplier_id", cost="$quote.cost")],
            [answer(action="cancel", source="none", cost="0")],
        ),
    ],
    "answer_fields": ["action", "source", "cost"],
}


def inventory_case(scenario: str, ids: Ids, rng: random.Random) -> Case:
    sku, supplier_id = ids.take(), ids.take()
    warehouse = rng.choice(REGIONS)
    qty = rng.randint(2, 40)
    on_hand = rng.randint(qty, qty + 30) if scenario == "ship" else rng.randint(0, qty - 1)
    if scenario == "ship":
        days = rng.randint(1, 30)
    else:
        days = rng.randint(1, 10) if scenario == "backorder" else rng.randint(11, 30)
    cost = str(qty * rng.randint(3, 40))
    expected = {
        "ship": {"action": "ship", "source": warehouse, "cost": "0"},
        "backorder": {"action": "backorder", "source": supplier_id, "cost": cost},
        "cancel": {"action": "cancel", "source": "none", "cost": "0"},
    }[scenario]
    return Case(
        prompt=f"Send {qty} units of sku {sku} from the {warehouse} warehouse.",
        inputs={"sku": sku, "warehouse": warehouse, "qty": str(qty)},
        expected=expected,
        rows={
            "stock": [{"sku": sku, "warehouse": warehouse, "on_hand": str(on_hand)}],
            "suppliers": [{"sku": sku, "supplier_id": supplier_id, "region": rng.choice(REGIONS)}],
            "quotes": [{"supplier_id": supplier_id, "qty": str(qty), "cost": cost, "days": str(days)}],
        },
    )


# --- access: user -> active ? none : disabled ? deny : lock reason -> benign ? unlock : escalate

ACCESS = {
    "name": "access",
    "description": "Handle a user who cannot log in, by account status and lock reason.",
    "procedure_text": (
        "Look up the user by email. If status is active, answer none with the user's team. "
        "If disabled, answer deny with team hr. If locked, get the lock reason by user_id: "
        "password or mfa gets unlock with the user's team; else answer escalate with team security."
    ),
    "tools": [
        tool(
            "lookup_user",
            "a user by email",
            ["email"],
            "users",
            "no user with email {email}",
            ["user_id", "status", "team"],
        ),
        tool("get_lock_reason", "why a user is locked", ["user_id"], "locks", "no lock record for user {user_id}"),
    ],
    "procedure": [
        call("lookup_user", {"email": "$input.email"}, "user"),
        when("$user.status", "equals", "active", [answer(action="none", team="$user.team")]),
        when("$user.status", "equals", "disabled", [answer(action="deny", team="hr")]),
        call("get_lock_reason", {"user_id": "$user.user_id"}, "lock"),
        when(
            "$lock.reason",
            "in",
            BENIGN_LOCKS,
            [answer(action="unlock", team="$user.team")],
            [answer(action="escalate", team="security")],
        ),
    ],
    "answer_fields": ["action", "team"],
}


def access_case(scenario: str, ids: Ids, rng: random.Random) -> Case:
    user_id, email = ids.take(), f"u{ids.take()}@corp.com"
    status = scenario if scenario in ("active", "disabled") else "locked"
    team = rng.choice(TEAMS)
    if scenario in ("active", "disabled"):
        reason = rng.choice(BENIGN_LOCKS + RISKY_LOCKS)
    else:
        reason = rng.choice(BENIGN_LOCKS) if scenario == "unlock" else rng.choice(RISKY_LOCKS)
    expected = {
        "active": {"action": "none", "team": team},
        "disabled": {"action": "deny", "team": "hr"},
        "unlock": {"action": "unlock", "team": team},
        "escalate": {"action": "escalate", "team": "security"},
    }[scenario]
    return Case(
        prompt=f"User {email} cannot log in.",
        inputs={"email": email},
        expected=expected,
        rows={
            "users": [{"email": email, "user_id": user_id, "status": status, "team": team}],
            "locks": [{"user_id": user_id, "reason": reason, "attempts": str(rng.randint(1, 9))}],
        },
    )


DOMAINS = [
    DomainSpec(REFUNDS, ["cancelled", "late", "gold", "standard"], refunds_case),
    DomainSpec(INVENTORY, ["ship", "backorder", "cancel"], inventory_case),
    DomainSpec(ACCESS, ["active", "disabled", "unlock", "escalate"], access_case),
]


# --- generation and writing -------------------------------------------------------------


def generate(
    spec: DomainSpec, sizes: dict[str, int]
) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, Any]]]]:
    """Fixture tables and tasks per split for one domain, from a seed of its own."""
    name = spec.meta["name"]
    rng = random.Random(f"{SEED}-{name}")
    tables: dict[str, list[dict[str, str]]] = {}
    splits: dict[str, list[dict[str, Any]]] = {}
    ids = Ids(rng, *ID_RANGE)
    for split, size in sizes.items():
        plan = [spec.scenarios[i % len(spec.scenarios)] for i in range(size)]
        rng.shuffle(plan)
        splits[split] = []
        for index, scenario in enumerate(plan):
            case = spec.build(scenario, ids, rng)
            for table, rows in case.rows.items():
                tables.setdefault(table, []).extend(rows)
            splits[split].append(
                {
                    "task_id": f"{name}-{split}-{index:04d}",
                    "prompt": case.prompt,
                    "inputs": case.inputs,
                    "expected": case.expected,
                    "scenario": scenario,
                }
            )
    return tables, splits


def write_domain(spec: DomainSpec, out: Path, sizes: dict[str, int]) -> None:
    tables, splits = generate(spec, sizes)
    folder = out / spec.meta["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "domain.json").write_text(json.dumps(spec.meta, indent=2) + "\n")
    (folder / "fixtures.json").write_text(_tables_json(tables))
    for split, tasks in splits.items():
        (folder / f"tasks_{split}.jsonl").write_text("".join(json.dumps(task) + "\n" for task in tasks))


def _tables_json(tables: dict[str, list[dict[str, str]]]) -> str:
    """JSON with one row per line, so diffs of regenerated fixtures stay readable."""
    blocks = []
    for table, rows in tables.items():
        body = ",\n".join(f"    {json.dumps(row)}" for row in rows)
        blocks.append(f"  {json.dumps(table)}: [\n{body}\n  ]")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the domain folders into")
    parser.add_argument("--train", type=int, default=SPLIT_SIZES["train"], help="training tasks per domain")
    parser.add_argument("--heldout", type=int, default=SPLIT_SIZES["heldout"], help="held-out tasks per domain")
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "heldout": args.heldout}
    for spec in DOMAINS:
        write_domain(spec, args.out, sizes)
        print(f"wrote {args.out / spec.meta['name']}: {sizes['train']} train, {sizes['heldout']} heldout tasks")


if __name__ == "__main__":
    main()
