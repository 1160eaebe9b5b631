"""Make the shipped SOP-Bench-format domain data/sopbench/appliance_warranty (our own data, not SOP-Bench's).

The folder has the layout of a domain of the public SOP-Bench benchmark (rl_core/environments/sopbench.py):
  sop.txt                        the procedure (written by hand, not by this script)
  tools.py                       ApplianceWarrantyManager: one method per tool, deterministic in-memory tables
  toolspecs.json                 the tools in the Bedrock Converse toolSpec form
  test_set_with_outputs.csv      one claim a row: the input columns and the expected output columns
  metadata.json                  name, domain, description, input_columns, output_columns, id_column

The tables are drawn from a seeded random generator; each row's expected outputs are what `solve` finds by
following sop.txt through the written manager's own tools, so the CSV and the tools cannot disagree. Some
rows name a serial number that is not registered or an issue code that is not in the catalogue: their
lookups raise, and the procedure says what that means. Deterministic; runs in well under a second:
    python scripts/make_sopbench_domain.py [--out DIR] [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import pprint
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "sopbench" / "appliance_warranty"
INPUT_COLUMNS = ["claim_id", "serial_number", "issue_code", "claim_date"]
OUTPUT_COLUMNS = ["decision", "coverage", "customer_charge"]

MODELS = {  # model_code: category, base warranty (months), replacement threshold, cost multiplier
    "AW-FRG-200": ("refrigerator", 24, 450, 1.5),
    "AW-WSH-310": ("washer", 12, 380, 1.2),
    "AW-DRY-120": ("dryer", 12, 300, 1.0),
    "AW-DSH-450": ("dishwasher", 24, 350, 1.1),
    "AW-OVN-700": ("oven", 12, 500, 1.3),
    "AW-MWV-050": ("microwave", 12, 120, 0.5),
}
ISSUES = {  # issue_code: description, cause, part, base cost
    "IC-101": ("control board does not respond", "manufacturing_defect", "control board", 180),
    "IC-102": ("drive motor or compressor failure", "manufacturing_defect", "motor", 320),
    "IC-103": ("door seal worn or torn", "wear", "door seal", 60),
    "IC-104": ("heating element burnt out", "wear", "heating element", 140),
    "IC-105": ("housing cracked by an impact", "misuse", "housing", 200),
    "IC-106": ("water damage from a wrong installation", "misuse", "wiring loom", 240),
    "IC-107": ("scratched or dented front panel", "cosmetic", "front panel", 90),
    "IC-108": ("temperature or level sensor fault", "manufacturing_defect", "sensor", 110),
}
SPARE_PARTS = ["control board", "motor", "door seal", "heating element", "housing", "wiring loom", "front panel"]
PLAN_MONTHS = {"gold": 24, "platinum": 36}
UNKNOWN_ISSUES = ["IC-150", "IC-199"]
ISSUE_WEIGHTS = {"manufacturing_defect": 4, "wear": 2, "misuse": 1, "cosmetic": 1}  # how often claims name a cause


def months_owned(purchase: str, claim: str) -> int:
    """Whole months from `purchase` to `claim` (YYYY-MM-DD): one per monthly anniversary on or before the claim
    date (sop.txt, definition 3.4; purchase days are 1-28, so every month has the anniversary)."""
    p, c = dt.date.fromisoformat(purchase), dt.date.fromisoformat(claim)
    return (c.year - p.year) * 12 + (c.month - p.month) - (1 if c.day < p.day else 0)


def solve(manager: Any, claim: dict[str, str]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Follow sop.txt for one claim through `manager`'s tools: the calls made, in order ((tool, arguments),
    the last one `record_decision`), and the final answer (decision, coverage, customer_charge as text)."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def call(tool: str, **arguments: Any) -> Any:
        calls.append((tool, arguments))
        return getattr(manager, tool)(**arguments)

    def settle(decision: str, coverage: str, charge: int) -> tuple[list, dict[str, str]]:
        call(
            "record_decision", claim_id=claim["claim_id"], decision=decision, coverage=coverage, customer_charge=charge
        )
        return calls, {"decision": decision, "coverage": coverage, "customer_charge": str(charge)}

    try:
        unit = call("get_registration", serial_number=claim["serial_number"])
    except ValueError:
        return settle("reject_unregistered", "none", 0)
    history = call("get_claim_history", customer_id=unit["customer_id"])
    if history["fraud_flag"] or history["claims_last_12_months"] >= 3:
        return settle("escalate", "pending", 0)
    terms = call("get_model_terms", model_code=unit["model_code"])
    base, plan = terms["base_warranty_months"], unit["extended_plan"]
    owned = months_owned(unit["purchase_date"], claim["claim_date"])
    if owned < base:
        coverage = "base"
    elif plan in PLAN_MONTHS and owned < base + PLAN_MONTHS[plan]:
        coverage = "extended"
    else:
        coverage = "none"
    try:
        diagnosis = call("diagnose_issue", model_code=unit["model_code"], issue_code=claim["issue_code"])
    except ValueError:
        return settle("inspect", coverage, 0)
    cost, cause = diagnosis["repair_cost"], diagnosis["cause"]
    covered = cause == "manufacturing_defect" or (cause == "wear" and plan == "platinum")
    if coverage == "none" or not covered:
        return settle("paid_repair", coverage, cost)
    decision = "replace" if cost > terms["replacement_threshold"] else "repair"
    charge = 50 if coverage == "extended" and plan == "gold" else 0
    return settle(decision, coverage, charge)


def make_tables(rng: random.Random, rows: int) -> tuple[dict, dict, list[dict[str, str]]]:
    """Registrations (serial -> unit), claim histories (customer -> history) and the claims (input columns)."""
    customers = {}
    for number in range(2001, 2031):
        claims = rng.choices([0, 1, 2, 3, 4], weights=[40, 30, 16, 9, 5])[0]
        customers[f"C-{number}"] = {"claims_last_12_months": claims, "fraud_flag": rng.random() < 0.07}
    registrations = {}
    for _ in range(rows - 4):
        serial = f"SN-{rng.randrange(40000, 49999)}"
        purchase = dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(0, 5 * 365))
        registrations[serial] = {
            "model_code": rng.choice(sorted(MODELS)),
            "customer_id": rng.choice(sorted(customers)),
            "purchase_date": purchase.replace(day=min(purchase.day, 28)).isoformat(),
            "extended_plan": rng.choices(["none", "gold", "platinum"], weights=[45, 30, 25])[0],
        }
    serials = sorted(registrations)
    codes = sorted(ISSUES)
    weights = [ISSUE_WEIGHTS[ISSUES[code][1]] for code in codes]
    claims = []
    for index in range(rows):
        serial = serials[index] if index < len(serials) else f"SN-{rng.randrange(90000, 99999)}"
        unit = registrations.get(serial)
        start = dt.date.fromisoformat(unit["purchase_date"]) if unit else dt.date(2021, 1, 1)
        claim_date = min(start + dt.timedelta(days=rng.randrange(10, 4 * 365)), dt.date(2025, 6, 30))
        issue = rng.choice(UNKNOWN_ISSUES) if rng.random() < 0.07 else rng.choices(codes, weights)[0]
        claims.append(
            {
                "claim_id": f"WC-{1001 + index}",
                "serial_number": serial,
                "issue_code": issue,
                "claim_date": claim_date.isoformat(),
            }
        )
    rng.shuffle(claims)
    return registrations, customers, claims


TOOLS_TEMPLATE = '''"""Tools of the appliance_warranty domain (an SOP-Bench-format domain made for Turnstile's tests).

Written by scripts/make_sopbench_domain.py; do not edit by hand. `ApplianceWarrantyManager` holds the
tools as methods (their specifications are in toolspecs.json). The tables are read-only; the one piece of
state is the decisions recorded by `record_decision`, kept per manager instance (one instance per episode).
Lookups of an unknown serial number, customer, model or issue code raise ValueError, as do bad
arguments to record_decision.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

MODELS = {models}

ISSUES = {issues}

SPARE_PARTS = {spare_parts}

REGISTRATIONS = {registrations}

CLAIM_HISTORY = {customers}

DECISIONS = ("repair", "replace", "paid_repair", "inspect", "escalate", "reject_unregistered")
COVERAGES = ("base", "extended", "none", "pending")


class ApplianceWarrantyManager:
    """The warranty claims back office: registrations, claim histories, model terms, diagnosis and the
    decision log."""

    def __init__(self) -> None:
        self.recorded: dict[str, dict[str, Any]] = {{}}

    def get_registration(self, serial_number: str) -> dict[str, Any]:
        """The registered unit with this serial number. Raises ValueError when it is not registered."""
        unit = REGISTRATIONS.get(serial_number)
        if unit is None:
            raise ValueError(f"serial number {{serial_number}} is not registered")
        return {{"serial_number": serial_number, **unit}}

    def get_claim_history(self, customer_id: str) -> dict[str, Any]:
        """Warranty claims of the last 12 months and the fraud flag of a customer. Raises ValueError for an
        unknown customer."""
        history = CLAIM_HISTORY.get(customer_id)
        if history is None:
            raise ValueError(f"no customer {{customer_id}}")
        return {{"customer_id": customer_id, **history}}

    def get_model_terms(self, model_code: str) -> dict[str, Any]:
        """Warranty terms of a model, with informational service notes. Raises ValueError for an unknown model."""
        if model_code not in MODELS:
            raise ValueError(f"unknown model code {{model_code}}")
        category, base, threshold, _ = MODELS[model_code]
        return {{
            "model_code": model_code,
            "category": category,
            "base_warranty_months": base,
            "replacement_threshold": threshold,
            "extended_plans": {{"gold": "24 months after the base warranty, deductible 50",
                                "platinum": "36 months after the base warranty, wear parts included"}},
            "service_notes": f"Book a two hour visit slot for a {{category}}; bring the diagnostic kit.",
            "spare_parts": SPARE_PARTS,
        }}

    def diagnose_issue(self, model_code: str, issue_code: str) -> dict[str, Any]:
        """Cause and repair cost (parts and labour) of an issue on a model. Raises ValueError for an unknown
        model or an issue code that is not in the catalogue."""
        if model_code not in MODELS:
            raise ValueError(f"unknown model code {{model_code}}")
        if issue_code not in ISSUES:
            raise ValueError(f"issue code {{issue_code}} is not in the diagnosis catalogue")
        description, cause, part, cost = ISSUES[issue_code]
        return {{
            "issue_code": issue_code,
            "description": description,
            "cause": cause,
            "part": part,
            "repair_cost": round(cost * MODELS[model_code][3]),
        }}

    def record_decision(self, claim_id: str, decision: str, coverage: str, customer_charge: int) -> dict[str, Any]:
        """Record the decision of a claim, once. Raises ValueError for a decision or coverage outside the
        procedure's words, a negative charge, or a claim already recorded."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {{list(DECISIONS)}}, got {{decision!r}}")
        if coverage not in COVERAGES:
            raise ValueError(f"coverage must be one of {{list(COVERAGES)}}, got {{coverage!r}}")
        if isinstance(customer_charge, bool) or not isinstance(customer_charge, int) or customer_charge < 0:
            raise ValueError(f"customer_charge must be a whole number >= 0, got {{customer_charge!r}}")
        if claim_id in self.recorded:
            raise ValueError(f"claim {{claim_id}} is already recorded ({{self.recorded[claim_id]['reference']}})")
        reference = f"REC-{{claim_id}}-{{len(self.recorded) + 1}}"
        self.recorded[claim_id] = {{
            "decision": decision,
            "coverage": coverage,
            "customer_charge": customer_charge,
            "reference": reference,
            "recorded_on": _dt.date(2025, 7, 1).isoformat(),
        }}
        return {{"claim_id": claim_id, "status": "recorded", "reference": reference}}
'''


def spec(name: str, description: str, properties: dict[str, dict[str, str]]) -> dict[str, Any]:
    """One tool in the Bedrock Converse toolSpec form."""
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"toolSpec": {"name": name, "description": description, "inputSchema": {"json": schema}}}


def toolspecs() -> list[dict[str, Any]]:
    text = {"type": "string"}
    return [
        spec(
            "get_registration",
            "Look up a registered unit by serial number: model code, customer, purchase date, extended plan.",
            {"serial_number": {**text, "description": "Serial number on the rating plate, e.g. SN-48213"}},
        ),
        spec(
            "get_claim_history",
            "Warranty claims of a customer in the last 12 months and the fraud team's flag.",
            {"customer_id": {**text, "description": "Customer id from the registration, e.g. C-2014"}},
        ),
        spec(
            "get_model_terms",
            "Warranty terms of a model: base warranty months and replacement threshold, plus service notes.",
            {"model_code": {**text, "description": "Model code from the registration, e.g. AW-WSH-310"}},
        ),
        spec(
            "diagnose_issue",
            "Cause and repair cost of an issue code on a model.",
            {
                "model_code": {**text, "description": "Model code from the registration"},
                "issue_code": {**text, "description": "Issue code of the claim, e.g. IC-103"},
            },
        ),
        spec(
            "record_decision",
            "Record the decision of a claim in the claims system (once per claim).",
            {
                "claim_id": {**text, "description": "Claim id, e.g. WC-1001"},
                "decision": {**text, "description": "The decision, one of the words of section 6"},
                "coverage": {**text, "description": "The coverage, one of the words of section 6"},
                "customer_charge": {"type": "integer", "description": "What the customer pays, a whole number"},
            },
        ),
    ]


def load_manager(folder: Path) -> Any:
    """An ApplianceWarrantyManager from the tools.py written in `folder`."""
    loaded = importlib.util.spec_from_file_location("appliance_warranty_tools", folder / "tools.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module.ApplianceWarrantyManager()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=52)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    registrations, customers, claims = make_tables(rng, args.rows)
    args.out.mkdir(parents=True, exist_ok=True)

    def literal(value: Any) -> str:
        return pprint.pformat(value, width=116, sort_dicts=True)

    tools = TOOLS_TEMPLATE.format(
        models=literal(MODELS),
        issues=literal(ISSUES),
        spare_parts=literal(SPARE_PARTS),
        registrations=literal(registrations),
        customers=literal(customers),
    )
    (args.out / "tools.py").write_text(tools)
    # the repository's formatter (make lint checks every .py file); the file works unformatted too
    subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", str(args.out / "tools.py")], check=False)
    (args.out / "toolspecs.json").write_text(json.dumps(toolspecs(), indent=2) + "\n")
    metadata = {
        "name": "appliance_warranty",
        "domain": "Customer Service",
        "description": "Decide household appliance warranty claims: registration, fraud screen, coverage period, "
        "diagnosis, repair or replacement and the customer's charge.",
        "input_columns": INPUT_COLUMNS,
        "output_columns": OUTPUT_COLUMNS,
        "id_column": "claim_id",
    }
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    decisions: Counter[str] = Counter()
    with open(args.out / "test_set_with_outputs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=INPUT_COLUMNS + OUTPUT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for claim in claims:
            _, answer = solve(load_manager(args.out), claim)  # a fresh manager per claim, as in an episode
            writer.writerow({**claim, **answer})
            decisions[answer["decision"]] += 1
    print(f"wrote {args.out}: {len(claims)} claims, decisions {dict(sorted(decisions.items()))}")


if __name__ == "__main__":
    main()
