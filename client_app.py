"""Flower ClientApp: each message goes to its handler in :mod:`lorm_flwr.client.handlers`.

The handlers run in this process, or, with ``LORM_FLWR_NODE_WORKER=1`` on a deployed
SuperNode, in the node's long-lived worker (:mod:`lorm_flwr.client.node_worker`): Flower starts
a fresh process like this one for every deployed message, and the worker spares it the
imports and the model build. Nothing heavy is imported here for that reason.

Client code only: nothing here (or below it) imports the server's strategies.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lorm_flwr.client.node_worker import handle

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return handle("hello", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this task's shard; reply with the tensors and statistics the spec asks for."""
    return handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation: global parts + this client's own parts, on its test split."""
    return handle("evaluate", msg, context)


@app.query("task_grams")
def task_grams_query(msg: Message, context: Context) -> Message:
    """End of task: Grams of the adapted layers' inputs on the model sent, on this task's data."""
    return handle("task_grams", msg, context)
