"""`qlora-flow chat`: a multi-turn conversation with a model in the terminal.

The history is kept and sent whole each turn (rendered with the model's chat template); `/reset` starts over,
`/exit` (or end of input) ends the session. Answers stream to the terminal as they are generated.
"""

from __future__ import annotations

import sys
from typing import TextIO

from qlora.errors import PipelineInputError
from qlora.inference import LoadedModel, SamplingSettings, generate_texts

HELP = "Type a message; /reset starts a new conversation, /exit ends the session."


def terminal_streamer(tokenizer, out: TextIO):
    """transformers' TextStreamer (new tokens only, as they are decoded), printing into `out`."""
    from transformers import TextStreamer

    class OutStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="", file=out, flush=True)

    return OutStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_session(
    loaded: LoadedModel,
    settings: SamplingSettings,
    read_line=input,
    out: TextIO = sys.stdout,
    system_prompt: str | None = None,
) -> list[dict]:
    """Run the conversation until /exit or end of input; returns the history at the end."""
    if not loaded.has_chat_template:
        raise PipelineInputError(
            f"--model {loaded.source}: its tokenizer has no chat template, so it can't chat: use `generate`"
        )
    fresh = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(fresh)
    print(f"chatting with {loaded.source} ({loaded.kind}). {HELP}", file=out, flush=True)
    while True:
        try:
            text = read_line("you> ").strip()
        except EOFError:
            print(file=out)
            return history
        if not text:
            continue
        if text == "/exit":
            return history
        if text == "/reset":
            history = list(fresh)
            print("(conversation reset)", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", file=out, flush=True)
        streamer = terminal_streamer(loaded.tokenizer, out)
        (answer,) = generate_texts(loaded.model, loaded.tokenizer, [history], settings, streamer=streamer)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": answer})
