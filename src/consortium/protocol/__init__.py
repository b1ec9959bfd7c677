"""Coordinator and site runtimes: I/O-free state machines over typed messages."""
