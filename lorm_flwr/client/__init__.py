"""What a node does with a message: the training round, Gram statistics, the node
worker and its framing. Never imports :mod:`lorm_flwr.server`.
"""
