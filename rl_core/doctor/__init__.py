"""The training doctor: symptoms of a failing run (`symptoms`, read from its metric history by
`history`) and the pure decisions the run takes on them (`decisions`)."""

from rl_core.doctor.decisions import (
    COLLAPSE,
    DoctorDecision,
    decide_after_step,
    doctor_history,
    last_good_step,
    newly_reported,
)
from rl_core.doctor.symptoms import (
    NONFINITE_STEP,
    SYMPTOMS,
    Finding,
    diagnose,
)

__all__ = [
    "COLLAPSE",
    "NONFINITE_STEP",
    "SYMPTOMS",
    "DoctorDecision",
    "Finding",
    "decide_after_step",
    "diagnose",
    "doctor_history",
    "last_good_step",
    "newly_reported",
]
