"""``infantino-demo``: the whole lifecycle on one machine, in a few minutes.

A real sync server process, N real devices with disjoint shards of the infant photos as
their camera streams, a simulated caregiver labelling a budget of frames per round (most
uncertain first, and at random for comparison), learning, sync, aggregation into MLflow,
and optionally a refreshed extractor published through the gate mid-way.
"""
