"""The model lifecycle's rules: versions, their states, and the moves allowed between them.

``registry``: every model version with its hash, parent, round, sites,
privacy cost, evaluation and state, and the moves allowed between states.
``lineage``: the transcript's lifecycle entries replayed under those rules
(what ``consortium verify`` checks). The operations on a run folder
(canary, staged rollout, rollback, drift monitoring) are a driver,
``consortium.run.lifecycle``; each site's own drift check is
``consortium.learning.drift``.
"""
