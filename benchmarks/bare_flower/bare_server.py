"""ServerApp of the bare app: waits for the nodes, then ``rounds`` exchanges of empty messages."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    clients = int(context.run_config["num-clients"])
    nodes: list[int] = []
    while len(nodes) < clients:
        nodes = list(grid.get_node_ids())
        time.sleep(0.05)
    ends = []
    for r in range(int(context.run_config["rounds"])):
        content = RecordDict({"config": ConfigRecord({"round": r})})
        messages = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
        replies = list(grid.send_and_receive(messages))
        if len(replies) != len(nodes) or any(m.has_error() for m in replies):
            raise RuntimeError(f"round {r}: {len(replies)} replies, or an error among them")
        ends.append(time.time())
    path = str(context.run_config["timeline"])
    if path:
        with open(path, "w") as f:
            json.dump({"main_started": started, "round_ends": ends}, f)
