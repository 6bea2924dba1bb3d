"""The interactive front end on rank 0.

- A line ending in `\\` continues on the next line (multi-line prompts); newlines are kept.
- Commands: /set KEY VALUE, /beam N, /greedy, /sample, /show, /help, /quit.
- Filled blanks are highlighted on a terminal and plain when output is piped.
- Ctrl-C during generation stops it (every rank at the same step) and returns to the prompt;
  Ctrl-C at the prompt clears the line; EOF (Ctrl-D) or /quit shuts every rank down.

Ctrl-C is read as a key rather than taken as a signal (see _Terminal), because under torchrun the
signal would reach torchrun itself, which ends the job.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import threading
from typing import Callable

from ..requests import GenerationConfig, Request, Result
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
CTRL_C = b"\x03"


def render(result: Result, color: bool) -> str:
    if result.error:
        return f"error: {result.error}"
    text = "".join(f"{BLANK_STYLE}{t}{RESET}" if blank and color else t for t, blank in result.pieces)
    lines = [text]
    if not color:  # no highlighting: name the filled blanks instead
        lines.append("  blanks: " + " | ".join(b.strip() for b in result.blanks))
    if result.beams and len(result.beams) > 1:
        lines += [f"  beam {i}: {b}" for i, b in enumerate(result.beams)]
    if result.finish_reason == "interrupted":
        lines.append("(interrupted)")
    return "\n".join(lines)


class _Terminal:
    """Ctrl-C as a key, not a signal.

    Under torchrun the ranks run in their own sessions and the terminal's Ctrl-C signal would reach
    torchrun, which stops the whole job. So while the TTY runs, rank 0 unassigns the terminal's
    interrupt key (VINTR): at the prompt readline gets Ctrl-C as a key that clears the line, and
    during generation rank 0 polls the terminal for it and stops every rank at the same step.
    The terminal's settings are restored on exit.
    """

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved = termios.tcgetattr(self.fd) if self.fd is not None else None
        self.hit = False
        self.prompting()

    def _set(self, clear_lflags: int = 0, key_at_a_time: bool = False) -> None:
        attrs = termios.tcgetattr(self.fd)
        attrs[3] = self.saved[3] & ~clear_lflags
        attrs[6][termios.VINTR] = os.fpathconf(self.fd, "PC_VDISABLE")
        if key_at_a_time:
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def generating(self) -> Callable[[], bool] | None:
        """Key-at-a-time input for the duration of one generation; returns the Ctrl-C poll."""
        if self.fd is None:
            return None
        self.hit = False
        self._set(termios.ICANON | termios.ECHO, key_at_a_time=True)

        def poll() -> bool:
            while not self.hit and select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 1024)  # other keys typed meanwhile are dropped
                self.hit = not data or CTRL_C in data
                if not data:
                    break
            return self.hit

        return poll

    def prompting(self) -> None:
        if self.fd is not None:
            self._set()


class _KeepAlive:
    """While rank 0 waits for a person (or a slow pipe), a thread sends keep-alives so the idle
    workers never reach the collective timeout. The lock keeps them apart from real commands."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(KEEPALIVE_S):
            with self.lock:
                if not self.stop.is_set():
                    self.coordinator.keepalive()

    def __enter__(self) -> "_KeepAlive":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.stop.set()
        self.thread.join()


def read_line(prompt: str, coordinator: Coordinator, interactive: bool) -> str:
    with _KeepAlive(coordinator):
        if interactive:
            return input(prompt)  # readline: editing and history
        line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def read_prompt(coordinator: Coordinator, interactive: bool) -> str:
    lines = [read_line(">>> ", coordinator, interactive)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line("... ", coordinator, interactive))
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
    print(f"glm-tp: ready on {coordinator.tp.size} rank(s)", file=sys.stderr, flush=True)
    if interactive:
        try:
            import readline  # line editing and history for input()
            readline.parse_and_bind(r'"\C-c": kill-whole-line')
        except ImportError:
            pass
        print("glm-tp: type a prompt with [MASK] or [gMASK] blanks, /help for commands, Ctrl-D to quit")
    count = 0
    try:
        while True:
            terminal.prompting()
            try:
                text = read_prompt(coordinator, interactive)
            except KeyboardInterrupt:  # a SIGINT sent by other means than the keyboard
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
            poll = terminal.generating()
            result = coordinator.generate([Request(f"tty-{count}", text)], interrupt=poll)[0]
            print(render(result, use_color), flush=True)
    finally:
        terminal.restore()
