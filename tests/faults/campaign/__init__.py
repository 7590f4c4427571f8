"""The fault campaign of issue 13: workload, faults, invariants, report (``run_campaign.py``)."""
