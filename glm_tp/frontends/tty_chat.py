"""The TTY's chat mode, for models with a chat format (`ModelConfig.chat_template`).

`/chat` starts a conversation (an optional system message after it: `/chat be brief`), `/chat off` goes
back to plain prompts, `/new` starts the conversation again. In chat mode each prompt is the next user
message: the whole conversation goes through the model's chat format (the coordinator's `chat_format`), its
ids are run as they are, and the reply joins the conversation.
"""
from __future__ import annotations

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.types import Request, Result

CHAT_HELP = """  /chat [SYSTEM]   chat in the model's chat format (optional system message)   /chat off   plain prompts
  /new             start the conversation again"""


class ChatMode:
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.on = False
        self.messages: list[dict] = []

    def command(self, line: str) -> bool:
        """Handle /chat and /new; False when the line is another command."""
        name, _, rest = line.partition(" ")
        if name == "/new" and not rest:
            self.messages = [m for m in self.messages if m["role"] == "system"]
            print("  new conversation" if self.on else "  (not chatting: /chat starts)")
            return True
        if name != "/chat":
            return False
        if rest.strip() == "off":
            self.on = False
            print("  plain prompts")
        elif self.coordinator.chat_format is None:
            print("error: this model has no chat format: type prompts to continue or fill")
        else:
            self.on = True
            self.messages = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
            print("  chatting" + (" (with that system message)" if rest.strip() else "") + ": /chat off ends it")
        return True

    def request(self, request_id: str, text: str) -> Request:
        """The next user message's request: the conversation's ids in the model's chat format."""
        chat = self.coordinator.chat_format
        messages = self.messages + [{"role": "user", "content": text}]
        return Request(request_id, token_ids=chat(messages))

    def answered(self, text: str, result: Result) -> str:
        """Keep the exchange (unless it failed) and give the reply as shown."""
        if result.error:
            return f"error: {result.error}"
        reply = "".join(result.blanks).strip()
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply
