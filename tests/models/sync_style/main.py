import threading
import time

from ws_server import AnythingBaseModel


class SyncStyle(AnythingBaseModel):
    """Written without async: plain hooks and a plain generator that blocks."""

    def on_chat_start(self):
        self.context["started"] = True

    def on_chat_messages(self, messages):
        for word in messages[-1]["content"].split():
            time.sleep(0.02)  # blocking: must not stall other sessions
            yield word + "@" + ("main" if threading.current_thread() is threading.main_thread() else "thread") + " "
