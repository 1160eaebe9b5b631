"""Tools of the appliance_warranty domain (an SOP-Bench-format domain made for Turnstile's tests).

Written by scripts/make_sopbench_domain.py; do not edit by hand. `ApplianceWarrantyManager` holds the
tools as methods (their specifications are in toolspecs.json). The tables are read-only; the one piece of
state is the decisions recorded by `record_decision`, kept per manager instance (one instance per episode).
Lookups of an unknown serial number, customer, model or issue code raise ValueError, as do bad
arguments to record_decision.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

MODELS = {
    "AW-DRY-120": ("dryer", 12, 300, 1.0),
    "AW-DSH-450": ("dishwasher", 24, 350, 1.1),
    "AW-FRG-200": ("refrigerator", 24, 450, 1.5),
    "AW-MWV-050": ("microwave", 12, 120, 0.5),
    "AW-OVN-700": ("oven", 12, 500, 1.3),
    "AW-WSH-310": ("washer", 12, 380, 1.2),
}

ISSUES = {
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

REGISTRATIONS = {
    "SN-40369": {
        "customer_id": "C-2006",
        "extended_plan": "gold",
        "model_code": "AW-FRG-200",
        "purchase_date": "2021-08-03",
    },
    "SN-40443": {
        "customer_id": "C-2010",
        "extended_plan": "platinum",
        "model_code": "AW-OVN-700",
        "purchase_date": "2023-04-02",
    },
    "SN-40474": {
        "customer_id": "C-2016",
        "extended_plan": "none",
        "model_code": "AW-FRG-200",
        "purchase_date": "2019-02-27",
    },
    "SN-41320": {
        "customer_id": "C-2013",
        "extended_plan": "gold",
        "model_code": "AW-MWV-050",
        "purchase_date": "2019-12-07",
    },
    "SN-41491": {
        "customer_id": "C-2017",
        "extended_plan": "none",
        "model_code": "AW-FRG-200",
        "purchase_date": "2022-11-26",
    },
    "SN-41677": {
        "customer_id": "C-2005",
        "extended_plan": "gold",
        "model_code": "AW-OVN-700",
        "purchase_date": "2019-01-01",
    },
    "SN-41683": {
        "customer_id": "C-2030",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-12-14",
    },
    "SN-41964": {
        "customer_id": "C-2025",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-03-06",
    },
    "SN-42243": {
        "customer_id": "C-2028",
        "extended_plan": "gold",
        "model_code": "AW-MWV-050",
        "purchase_date": "2023-08-05",
    },
    "SN-42361": {
        "customer_id": "C-2011",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2019-07-28",
    },
    "SN-42602": {
        "customer_id": "C-2001",
        "extended_plan": "none",
        "model_code": "AW-DSH-450",
        "purchase_date": "2019-12-15",
    },
    "SN-42736": {
        "customer_id": "C-2018",
        "extended_plan": "gold",
        "model_code": "AW-DSH-450",
        "purchase_date": "2020-12-28",
    },
    "SN-42924": {
        "customer_id": "C-2011",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-06-07",
    },
    "SN-43197": {
        "customer_id": "C-2027",
        "extended_plan": "none",
        "model_code": "AW-DSH-450",
        "purchase_date": "2023-07-09",
    },
    "SN-43362": {
        "customer_id": "C-2005",
        "extended_plan": "gold",
        "model_code": "AW-FRG-200",
        "purchase_date": "2021-12-17",
    },
    "SN-43714": {
        "customer_id": "C-2016",
        "extended_plan": "none",
        "model_code": "AW-OVN-700",
        "purchase_date": "2020-02-14",
    },
    "SN-43780": {
        "customer_id": "C-2006",
        "extended_plan": "none",
        "model_code": "AW-DRY-120",
        "purchase_date": "2019-11-06",
    },
    "SN-43822": {
        "customer_id": "C-2027",
        "extended_plan": "gold",
        "model_code": "AW-MWV-050",
        "purchase_date": "2019-01-25",
    },
    "SN-44056": {
        "customer_id": "C-2030",
        "extended_plan": "platinum",
        "model_code": "AW-MWV-050",
        "purchase_date": "2021-03-25",
    },
    "SN-44304": {
        "customer_id": "C-2005",
        "extended_plan": "none",
        "model_code": "AW-DRY-120",
        "purchase_date": "2020-07-28",
    },
    "SN-44422": {
        "customer_id": "C-2022",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-08-28",
    },
    "SN-44662": {
        "customer_id": "C-2029",
        "extended_plan": "gold",
        "model_code": "AW-MWV-050",
        "purchase_date": "2023-01-07",
    },
    "SN-45072": {
        "customer_id": "C-2022",
        "extended_plan": "platinum",
        "model_code": "AW-OVN-700",
        "purchase_date": "2022-08-18",
    },
    "SN-45140": {
        "customer_id": "C-2012",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2020-11-27",
    },
    "SN-45636": {
        "customer_id": "C-2003",
        "extended_plan": "platinum",
        "model_code": "AW-WSH-310",
        "purchase_date": "2023-06-26",
    },
    "SN-45726": {
        "customer_id": "C-2008",
        "extended_plan": "none",
        "model_code": "AW-DRY-120",
        "purchase_date": "2021-01-16",
    },
    "SN-45957": {
        "customer_id": "C-2003",
        "extended_plan": "platinum",
        "model_code": "AW-DRY-120",
        "purchase_date": "2022-06-10",
    },
    "SN-46049": {
        "customer_id": "C-2011",
        "extended_plan": "platinum",
        "model_code": "AW-OVN-700",
        "purchase_date": "2022-06-02",
    },
    "SN-46164": {
        "customer_id": "C-2009",
        "extended_plan": "platinum",
        "model_code": "AW-WSH-310",
        "purchase_date": "2019-11-01",
    },
    "SN-46485": {
        "customer_id": "C-2024",
        "extended_plan": "platinum",
        "model_code": "AW-MWV-050",
        "purchase_date": "2021-08-06",
    },
    "SN-46521": {
        "customer_id": "C-2004",
        "extended_plan": "gold",
        "model_code": "AW-MWV-050",
        "purchase_date": "2021-03-28",
    },
    "SN-46560": {
        "customer_id": "C-2003",
        "extended_plan": "platinum",
        "model_code": "AW-DSH-450",
        "purchase_date": "2019-05-08",
    },
    "SN-46804": {
        "customer_id": "C-2029",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-01-04",
    },
    "SN-47219": {
        "customer_id": "C-2011",
        "extended_plan": "gold",
        "model_code": "AW-DRY-120",
        "purchase_date": "2019-11-28",
    },
    "SN-47481": {
        "customer_id": "C-2026",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2023-11-19",
    },
    "SN-47624": {
        "customer_id": "C-2005",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2023-07-10",
    },
    "SN-47701": {
        "customer_id": "C-2007",
        "extended_plan": "gold",
        "model_code": "AW-FRG-200",
        "purchase_date": "2020-02-07",
    },
    "SN-47841": {
        "customer_id": "C-2006",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2023-08-25",
    },
    "SN-47996": {
        "customer_id": "C-2016",
        "extended_plan": "none",
        "model_code": "AW-MWV-050",
        "purchase_date": "2021-08-12",
    },
    "SN-48088": {
        "customer_id": "C-2025",
        "extended_plan": "none",
        "model_code": "AW-DSH-450",
        "purchase_date": "2019-05-01",
    },
    "SN-48236": {
        "customer_id": "C-2008",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2020-11-06",
    },
    "SN-48445": {
        "customer_id": "C-2022",
        "extended_plan": "gold",
        "model_code": "AW-WSH-310",
        "purchase_date": "2022-06-18",
    },
    "SN-48989": {
        "customer_id": "C-2001",
        "extended_plan": "none",
        "model_code": "AW-DSH-450",
        "purchase_date": "2022-01-27",
    },
    "SN-49501": {
        "customer_id": "C-2003",
        "extended_plan": "platinum",
        "model_code": "AW-MWV-050",
        "purchase_date": "2023-06-21",
    },
    "SN-49762": {
        "customer_id": "C-2030",
        "extended_plan": "none",
        "model_code": "AW-WSH-310",
        "purchase_date": "2021-08-28",
    },
    "SN-49867": {
        "customer_id": "C-2004",
        "extended_plan": "none",
        "model_code": "AW-MWV-050",
        "purchase_date": "2021-01-15",
    },
    "SN-49914": {
        "customer_id": "C-2026",
        "extended_plan": "platinum",
        "model_code": "AW-MWV-050",
        "purchase_date": "2020-12-06",
    },
    "SN-49998": {
        "customer_id": "C-2016",
        "extended_plan": "platinum",
        "model_code": "AW-DRY-120",
        "purchase_date": "2023-09-18",
    },
}

CLAIM_HISTORY = {
    "C-2001": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2002": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2003": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2004": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2005": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2006": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2007": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2008": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2009": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2010": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2011": {"claims_last_12_months": 4, "fraud_flag": True},
    "C-2012": {"claims_last_12_months": 2, "fraud_flag": False},
    "C-2013": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2014": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2015": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2016": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2017": {"claims_last_12_months": 1, "fraud_flag": True},
    "C-2018": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2019": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2020": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2021": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2022": {"claims_last_12_months": 2, "fraud_flag": False},
    "C-2023": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2024": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2025": {"claims_last_12_months": 2, "fraud_flag": False},
    "C-2026": {"claims_last_12_months": 4, "fraud_flag": False},
    "C-2027": {"claims_last_12_months": 1, "fraud_flag": False},
    "C-2028": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2029": {"claims_last_12_months": 0, "fraud_flag": False},
    "C-2030": {"claims_last_12_months": 2, "fraud_flag": False},
}

DECISIONS = ("repair", "replace", "paid_repair", "inspect", "escalate", "reject_unregistered")
COVERAGES = ("base", "extended", "none", "pending")


class ApplianceWarrantyManager:
    """The warranty claims back office: registrations, claim histories, model terms, diagnosis and the
    decision log."""

    def __init__(self) -> None:
        self.recorded: dict[str, dict[str, Any]] = {}

    def get_registration(self, serial_number: str) -> dict[str, Any]:
        """The registered unit with this serial number. Raises ValueError when it is not registered."""
        unit = REGISTRATIONS.get(serial_number)
        if unit is None:
            raise ValueError(f"serial number {serial_number} is not registered")
        return {"serial_number": serial_number, **unit}

    def get_claim_history(self, customer_id: str) -> dict[str, Any]:
        """Warranty claims of the last 12 months and the fraud flag of a customer. Raises ValueError for an
        unknown customer."""
        history = CLAIM_HISTORY.get(customer_id)
        if history is None:
            raise ValueError(f"no customer {customer_id}")
        return {"customer_id": customer_id, **history}

    def get_model_terms(self, model_code: str) -> dict[str, Any]:
        """Warranty terms of a model, with informational service notes. Raises ValueError for an unknown model."""
        if model_code not in MODELS:
            raise ValueError(f"unknown model code {model_code}")
        category, base, threshold, _ = MODELS[model_code]
        return {
            "model_code": model_code,
            "category": category,
            "base_warranty_months": base,
            "replacement_threshold": threshold,
            "extended_plans": {
                "gold": "24 months after the base warranty, deductible 50",
                "platinum": "36 months after the base warranty, wear parts included",
            },
            "service_notes": f"Book a two hour visit slot for a {category}; bring the diagnostic kit.",
            "spare_parts": SPARE_PARTS,
        }

    def diagnose_issue(self, model_code: str, issue_code: str) -> dict[str, Any]:
        """Cause and repair cost (parts and labour) of an issue on a model. Raises ValueError for an unknown
        model or an issue code that is not in the catalogue."""
        if model_code not in MODELS:
            raise ValueError(f"unknown model code {model_code}")
        if issue_code not in ISSUES:
            raise ValueError(f"issue code {issue_code} is not in the diagnosis catalogue")
        description, cause, part, cost = ISSUES[issue_code]
        return {
            "issue_code": issue_code,
            "description": description,
            "cause": cause,
            "part": part,
            "repair_cost": round(cost * MODELS[model_code][3]),
        }

    def record_decision(self, claim_id: str, decision: str, coverage: str, customer_charge: int) -> dict[str, Any]:
        """Record the decision of a claim, once. Raises ValueError for a decision or coverage outside the
        procedure's words, a negative charge, or a claim already recorded."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {list(DECISIONS)}, got {decision!r}")
        if coverage not in COVERAGES:
            raise ValueError(f"coverage must be one of {list(COVERAGES)}, got {coverage!r}")
        if isinstance(customer_charge, bool) or not isinstance(customer_charge, int) or customer_charge < 0:
            raise ValueError(f"customer_charge must be a whole number >= 0, got {customer_charge!r}")
        if claim_id in self.recorded:
            raise ValueError(f"claim {claim_id} is already recorded ({self.recorded[claim_id]['reference']})")
        reference = f"REC-{claim_id}-{len(self.recorded) + 1}"
        self.recorded[claim_id] = {
            "decision": decision,
            "coverage": coverage,
            "customer_charge": customer_charge,
            "reference": reference,
            "recorded_on": _dt.date(2025, 7, 1).isoformat(),
        }
        return {"claim_id": claim_id, "status": "recorded", "reference": reference}
