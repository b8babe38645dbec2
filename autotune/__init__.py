"""Tuning (MetaSchedule sweeps and the tuning database). Empty until the tuning issue lands."""
