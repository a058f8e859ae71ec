"""The node cache: prepared data and scenarios kept on disk between messages and runs.

Shared by both sides (the server reads the same data and split), so it lives in a
room of its own rather than under :mod:`lorm_flwr.client.round`.
"""
