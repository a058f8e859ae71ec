"""ClientApp of the bare app: answers every message at once."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)
