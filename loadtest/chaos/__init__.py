"""The chaos suite: a workload, a nemesis and a checker over the whole
history, on the compose stack (`make chaos`; a short schedule in `make test`).
"""
