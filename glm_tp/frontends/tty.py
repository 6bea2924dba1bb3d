"""The interactive front end on rank 0.

- A line ending in `\\` continues on the next line (multi-line prompts); newlines are kept.
- Commands: /set KEY VALUE, /beam N, /greedy, /sample, /show, /help, /quit.
- Filled blanks are highlighted on a terminal and plain when output is piped.
- Ctrl-C during generation stops it (every rank at the same step) and returns to the prompt;
  Ctrl-C at the prompt clears the line; EOF (Ctrl-D) or /quit shuts every rank down.

Under torchrun the terminal's Ctrl-C would reach torchrun itself and kill the job, so rank 0 makes
its own process group the terminal's foreground group: Ctrl-C then reaches rank 0 alone.
"""
from __future__ import annotations

import os
import select
import signal
import sys
from typing import Callable

from ..generation import GenerationConfig, Request, Result
from ..serve import KEEPALIVE_S, Coordinator

HELP = """commands:
  /set KEY VALUE   change a generation setting (e.g. /set temperature 0.7, /set max_new_tokens 64)
  /beam N          beam search with N beams        /greedy   greedy decoding
  /sample          sampling (temperature, top_k, top_p)
  /show            print the current settings       /help     this text
  /quit            exit (so does Ctrl-D)
prompts: put [MASK] (short blank), [sMASK] or [gMASK] (long blank, at the end) in the text; without a mask,
[gMASK] is appended. End a line with \\ to continue the prompt on the next line."""
BLANK_STYLE, RESET = "\033[1;32m\033[4m", "\033[0m"


def render(result: Result, color: bool) -> str:
    if result.error:
        return f"error: {result.error}"
    text = "".join(f"{BLANK_STYLE}{t}{RESET}" if blank and color else t for t, blank in result.pieces)
    lines = [text]
    if result.beams and len(result.beams) > 1:
        lines += [f"  beam {i}: {b}" for i, b in enumerate(result.beams)]
    if result.finish_reason == "interrupted":
        lines.append("(interrupted)")
    return "\n".join(lines)


class _Terminal:
    """Foreground process group for rank 0 and a flag-setting Ctrl-C handler during generation."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.previous_group: int | None = None
        self.interrupted = False
        if self.fd is not None and os.getpgrp() != os.tcgetpgrp(self.fd):
            return  # started in the background: leave the terminal alone
        if self.fd is not None and os.getpid() != os.getpgrp():
            self.previous_group = os.tcgetpgrp(self.fd)
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.setpgid(0, 0)
            os.tcsetpgrp(self.fd, os.getpgrp())

    def restore(self) -> None:
        if self.previous_group is not None:
            try:
                os.tcsetpgrp(self.fd, self.previous_group)
            except OSError:
                pass

    def catching(self) -> Callable[[], bool]:
        """Install the flag handler for one generation; returns the poll function."""
        self.interrupted = False

        def on_sigint(signum, frame):  # noqa: ARG001
            self.interrupted = True

        signal.signal(signal.SIGINT, on_sigint)
        return lambda: self.interrupted

    def prompting(self) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _read_line(prompt: str, coordinator: Coordinator, interactive: bool) -> str:
    """input() that keeps the workers alive while a person thinks."""
    if not interactive:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    sys.stdout.write(prompt)
    sys.stdout.flush()
    while not select.select([sys.stdin], [], [], KEEPALIVE_S)[0]:
        coordinator.keepalive()
    return input()


def read_prompt(coordinator: Coordinator, interactive: bool) -> str:
    lines = [_read_line(">>> ", coordinator, interactive)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(_read_line("... ", coordinator, interactive))
    return "\n".join(lines)


def handle_command(line: str, coordinator: Coordinator) -> bool:
    """Apply a /command; False means quit."""
    parts = line.split()
    name, args = parts[0], parts[1:]
    settings = coordinator.engine.default
    changes: dict[str, object] | None = None
    if name == "/quit":
        return False
    if name == "/help":
        print(HELP)
    elif name == "/show":
        print("  " + ", ".join(f"{k}={v}" for k, v in vars(settings).items()))
    elif name == "/greedy":
        changes = {"strategy": "greedy"}
    elif name == "/sample":
        changes = {"strategy": "sample"}
    elif name == "/beam" and len(args) == 1:
        changes = {"strategy": "beam", "num_beams": args[0]}
    elif name == "/set" and len(args) == 2:
        changes = {args[0]: args[1]}
    else:
        print(f"unknown command {line!r}: type /help")
    if changes is not None:
        try:
            new: GenerationConfig = settings.updated(**changes)
        except (ValueError, TypeError) as e:
            print(f"error: {e}")
        else:
            coordinator.set_default(new)
            print("  " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return True


def run_tty(coordinator: Coordinator, color: str = "auto") -> None:
    interactive = sys.stdin.isatty()
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    terminal = _Terminal()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("glm-tp: type a prompt with [MASK] or [gMASK] blanks, /help for commands, Ctrl-D to quit")
    count = 0
    try:
        while True:
            terminal.prompting()
            try:
                text = read_prompt(coordinator, interactive)
            except KeyboardInterrupt:
                print()
                continue
            except EOFError:
                break
            if not text.strip():
                continue
            if text.startswith("/"):
                if not handle_command(text.strip(), coordinator):
                    break
                continue
            count += 1
            poll = terminal.catching()
            result = coordinator.generate([Request(f"tty-{count}", text)], interrupt=poll)[0]
            print(render(result, use_color), flush=True)
    finally:
        terminal.prompting()
        terminal.restore()
