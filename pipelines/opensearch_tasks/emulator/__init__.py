"""A local emulator of Alibaba Cloud OpenSearch's function-task API (HTTP on 127.0.0.1).

It serves ListAppGroups, ListFunctionInstances, ListFunctionTasks and GetFunctionTask with
deterministic data, verifies ACS3 and legacy ROA signatures (and STS tokens), moves an emulated
clock, and injects faults (throttling, 5xx, stalls, drops, truncated bodies, errors inside 200s,
paging drift). ``Emulator.truth()`` is the ground truth a loaded table must match.
"""

from .emulator import Emulator
from .faults import FAULT_KINDS, FaultPlan
from .instance import GENERATE
from .payloads import ABSENT
from .server import RequestRecord
from .signing import sign_acs3
from .spec import FUNCTIONS, Target, WorldSpec

__all__ = [
    "ABSENT",
    "FAULT_KINDS",
    "FUNCTIONS",
    "GENERATE",
    "Emulator",
    "FaultPlan",
    "RequestRecord",
    "Target",
    "WorldSpec",
    "sign_acs3",
]
