"""Tuning: kernel parameters (params.py), the tuning database, MetaSchedule, remote measurement, sweeps."""
