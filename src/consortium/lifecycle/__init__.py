"""The model lifecycle (issue 9): versions, their states, canary evaluation, staged rollout, rollback, drift.

``registry``: every model version with its hash, parent, round, sites,
privacy cost, evaluation and state, and the moves allowed between states.
``lineage``: the transcript's lifecycle entries replayed under those rules
(what ``consortium verify`` checks). ``manager``: the operations on a run
folder, through the protocol and into the transcript. ``drift``: each site's
own check of its incoming data against its training data.
"""
