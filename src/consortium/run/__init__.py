"""The drivers: the only code that moves bytes between members (coordinator run, simulation, recorder,
round loop, recovery, halt and resume, the lifecycle manager), over the pure parts below."""
