"""The ServerApp's side: the run (hello, tasks x rounds, task ends, resume), the one
exchange path, the strategies, evaluation, checkpoints, results, the dry run and
the joint baselines. Never imports :mod:`lorm_flwr.client.round`.
"""
