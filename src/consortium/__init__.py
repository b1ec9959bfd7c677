"""Consortium: train one model across institutions that never reveal their raw data."""

__version__ = "0.1.0"
