"""Group level (placeholder until the group-level issue lands)."""
from ..errors import UsageError


def run_group(args) -> int:
    raise UsageError("the group level is not built yet in this version; run the participant level")
