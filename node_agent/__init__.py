"""The node agent: runs on a build machine, takes task-runs from its queue, runs scripts."""
