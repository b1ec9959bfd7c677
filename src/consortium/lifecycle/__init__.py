"""The model lifecycle (issue 9): what a site watches between rounds, and, to come, the registry of
model versions, canary evaluation, staged rollout and rollback.

So far: ``drift``, each site's own check of its incoming data against its training data.
"""
