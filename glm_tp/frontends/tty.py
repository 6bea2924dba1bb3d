"""The interactive front end on rank 0.

- A line ending in `\\` continues on the next line (multi-line prompts); newlines are kept. Input that ends
  after such a line runs the prompt typed so far. A blank line is no prompt: nothing runs, as in a shell.
- Commands: /set KEY VALUE, /beam N, /greedy, /sample, /show, /help, /quit. `/set stop` takes one string,
  a JSON string or list (`/set stop "\\n"`, `/set stop [".", "!"]`), or nothing or `none` to clear it.
  `/format json|schema {...}|regex P|text` sets the answers' format (tty_format.py).
- Input that is not UTF-8 is refused with one line (read with surrogateescape, then checked), and the
  TTY goes on.
- Filled blanks are highlighted on a terminal and plain when output is piped.
- Ctrl-C during generation stops it (every rank at the same step) and returns to the prompt;
  Ctrl-C at the prompt clears the line; EOF (Ctrl-D) or /quit shuts every rank down.

Ctrl-C is read as a key rather than taken as a signal (see _Terminal), because under torchrun the
signal would reach torchrun itself, which ends the job. SIGTERM or SIGHUP (torchrun passes them on when
the job is stopped or a rank died) ends the TTY like /quit, after the generation in flight stops; a
keep-alive that finds the other ranks gone or hung ends it with that error. The terminal's settings are
restored whatever happens.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
from typing import Callable

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.core import KEEPALIVE_S
from glm_tp.engine.types import GenerationConfig, Request, Result
from glm_tp.frontends.tty_chat import CHAT_HELP, ChatMode
from glm_tp.frontends.tty_format import FORMAT_HELP, FormatMode
from glm_tp.text.blanks import PromptError
from glm_tp.text.unicode import TextError, check_text

HELP = """commands:
  /set KEY VALUE   change a generation setting (e.g. /set temperature 0.7, /set max_new_tokens 64)
                   /set stop TEXT, /set stop ["a", "b"] (JSON), /set stop (no value) or none: no stop strings
  /beam N          beam search with N beams        /greedy   greedy decoding
  /sample          sampling (temperature, top_k, top_p)
  /show            print the current settings       /help     this text
  /quit            exit (so does Ctrl-D)
{format}
{chat}prompts: {prompts} End a line with \\ to continue the prompt on the next line."""
BLANK_PROMPTS = """put [MASK] (short blank), [sMASK] or [gMASK] (long blank, at the end) in the text; without a mask,
[gMASK] is appended."""
CAUSAL_PROMPTS = "the model continues the text (it has no blank infilling)."
BLANK_STYLE, RESET = "\033[1;32m\033[4m", "\033[0m"
CTRL_C = b"\x03"


def render(result: Result, color: bool, interrupted: bool = False, label: str = "blanks") -> str:
    """The answer as shown. An answer that ended on the cache's length before max_new_tokens was cut short
    by max_len, which the user should know (a max_new_tokens end is what they asked for). label: what the
    plain output calls the generated part (a causal model's is its answer, not blanks)."""
    if result.error:
        return f"error: {result.error}"
    text = "".join(f"{BLANK_STYLE}{t}{RESET}" if blank and color else t for t, blank in result.pieces)
    lines = [text]
    if not color:  # no highlighting: name the filled blanks instead
        lines.append(f"  {label}: " + " | ".join(b.strip() for b in result.blanks))
    if result.beams and len(result.beams) > 1:
        lines += [f"  beam {i}: {b}" for i, b in enumerate(result.beams)]
    if result.logprobs:  # /set logprobs N: each generated token, its logprob, and the top N
        lines += [f"  {lp.token!r} {lp.logprob:.3f}" + ("   top: " + ", ".join(f"{t!r} {v:.3f}" for _, t, v in lp.top)
                                                        if lp.top else "") for lp in result.logprobs]
    if interrupted or result.finish_reason == "interrupted":
        lines.append("(interrupted)")
    elif result.cut_by_max_len:
        lines.append("(cut short: prompt and answer reached max_len; a larger max_len leaves more room)")
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


class _Stop(Exception):
    """Raised in the main thread while it waits at the prompt, by a signal handler (_Signals)."""


class _Signals:
    """SIGTERM and SIGHUP end the TTY: at the prompt at once (the handler raises out of readline), during a
    generation at the next step, through the interrupt poll. A failed keep-alive wakes the main thread with
    SIGUSR1 (sent to that thread, so that its blocking read returns) to raise the keep-alive's error."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.failure: BaseException | None = None
        self.at_prompt = False
        self.saved = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}

    def _on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002
        if signum != signal.SIGUSR1:
            self.reason = signal.Signals(signum).name
        if self.at_prompt:
            raise _Stop()

    def lost(self, error: BaseException) -> None:
        """From the keep-alive thread: the other ranks are gone."""
        self.failure = error
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def restore(self) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)


class _KeepAlive:
    """While rank 0 waits for a person (or a slow pipe), a thread sends keep-alives so the idle workers
    never reach the collective timeout; several per timeout, so a lost or hung rank is found within about
    one timeout. The lock keeps them apart from real commands."""

    def __init__(self, coordinator: Coordinator, signals: _Signals):
        self.coordinator, self.signals = coordinator, signals
        self.interval = min(KEEPALIVE_S, coordinator.tp.timeout_s / 4)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                if self.stop.is_set():
                    return
                try:
                    self.coordinator.keepalive()
                    continue
                except Exception as e:  # noqa: BLE001 - a failed collective: the main thread reports it
                    error = e
            self.signals.lost(error)
            return

    def __enter__(self) -> "_KeepAlive":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.stop.set()
        self.thread.join()


def read_line(prompt: str, coordinator: Coordinator, interactive: bool, signals: _Signals) -> str:
    with _KeepAlive(coordinator, signals):
        signals.at_prompt = True  # only around the blocking read: the handlers raise _Stop out of it
        try:
            if signals.reason or signals.failure:  # arrived just before
                raise _Stop()
            line = input(prompt) + "\n" if interactive else sys.stdin.readline()  # input(): readline editing
        finally:
            signals.at_prompt = False
    if not line:
        raise EOFError
    return line.rstrip("\n")


def read_prompt(coordinator: Coordinator, interactive: bool, signals: _Signals) -> str:
    lines = [read_line(">>> ", coordinator, interactive, signals)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line("... ", coordinator, interactive, signals))
        except EOFError:  # the input ended after a `\`: run what was typed rather than drop it
            if interactive:
                print()  # off the "... " line
            break
    return "\n".join(lines)


def _stop_value(value: str) -> object:
    """/set stop's value: nothing or none clears the stop strings; a JSON string or list ("\\n", ["a", "b"])
    gives those; other text is the one stop string, as typed."""
    if value.lower() in ("", "none", "null"):
        return ()
    if value[0] in "[\"":
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"stop: {value} is not a JSON string or list such as \"\\n\" or [\".\", \"!\"]") from None
    return value


def _changes(name: str, args: list[str]) -> dict[str, object] | None:
    """The settings a command changes; None for no such command."""
    if name == "/greedy":
        return {"strategy": "greedy"}
    if name == "/sample":
        return {"strategy": "sample"}
    if name == "/beam" and len(args) == 1:
        return {"strategy": "beam", "num_beams": args[0]}
    if name == "/set" and args[:1] == ["stop"]:
        return {"stop": _stop_value(args[1] if len(args) == 2 else "")}
    if name == "/set" and len(args) == 2:
        return {args[0]: args[1]}
    return None


def handle_command(line: str, coordinator: Coordinator) -> bool:
    """Apply a /command; False means quit."""
    parts = line.split(maxsplit=2) if line.startswith("/set ") else line.split()
    name, args = parts[0], parts[1:]
    if name == "/quit":
        return False
    if name == "/help":
        features = coordinator.features
        print(HELP.format(format=FORMAT_HELP, chat=CHAT_HELP + "\n" if features["chat"] else "",
                          prompts=BLANK_PROMPTS if features["blank_infilling"] else CAUSAL_PROMPTS))
    elif name == "/show":
        print("  " + ", ".join(f"{k}={v}" for k, v in vars(coordinator.default).items()))
    else:
        try:
            changes = _changes(name, args)
            if changes is None:
                print(f"unknown command {line!r}: type /help")
                return True
            new: GenerationConfig = coordinator.default.updated(**changes)
        except (ValueError, TypeError) as e:
            print(f"error: {e}")
        else:
            coordinator.set_default(new)
            print("  " + ", ".join(f"{k}={getattr(new, k)}" for k in changes))
    return True


def run_tty(coordinator: Coordinator, color: str = "auto") -> None:
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become lone surrogates, refused per line
        sys.stdin.reconfigure(errors="surrogateescape")
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    signals = _Signals()  # first: a SIGTERM from here on leaves through the finally below
    terminal: _Terminal | None = None
    try:
        terminal = _Terminal()
        print(f"glm-tp: ready on {coordinator.tp.size} rank(s)", file=sys.stderr, flush=True)
        if interactive:
            try:
                import readline  # line editing and history for input()
                readline.parse_and_bind(r'"\C-c": kill-whole-line')
            except ImportError:
                pass
            features = coordinator.features
            what = "a prompt with [MASK] or [gMASK] blanks" if features["blank_infilling"] else "a text to continue"
            chat = " (/chat to chat)" if features["chat"] else ""
            print(f"glm-tp: type {what}{chat}, /help for commands, Ctrl-D to quit")
        _loop(coordinator, terminal, signals, interactive, use_color)
    finally:
        if terminal is not None:
            terminal.restore()
        signals.restore()


def _loop(coordinator: Coordinator, terminal: _Terminal, signals: _Signals, interactive: bool, color: bool) -> None:
    count, chat, answers = 0, ChatMode(coordinator), FormatMode()
    label = "blanks" if coordinator.features["blank_infilling"] else "answer"
    while signals.reason is None:
        terminal.prompting()
        try:
            text = read_prompt(coordinator, interactive, signals)
        except KeyboardInterrupt:  # a SIGINT sent by other means than the keyboard
            print()
            continue
        except (EOFError, _Stop):
            break
        if not text.strip():
            continue
        try:
            check_text(text, "the command" if text.startswith("/") else "the prompt")
        except TextError as e:
            print(f"error: {e}", flush=True)
            continue
        if text.startswith("/"):
            line = text.strip()
            if answers.command(line) or chat.command(line):
                continue
            if not handle_command(line, coordinator):
                break
            continue
        count += 1
        keys = terminal.generating()
        stopped: list[bool] = []  # set once the poll said stop: every rank ends at that step

        def interrupt() -> bool:
            if not stopped and (signals.reason is not None or (keys is not None and keys())):
                stopped.append(True)
            return bool(stopped)

        try:
            request = chat.request(f"tty-{count}", text) if chat.on else Request(f"tty-{count}", text)
        except PromptError as e:  # messages the chat format cannot write
            print(f"error: {e}", flush=True)
            continue
        request.grammar = answers.grammar
        result = coordinator.generate([request], interrupt=interrupt)[0]
        shown = chat.answered(text, result) if chat.on else render(result, color, bool(stopped), label)
        print(shown, flush=True)
    if signals.failure is not None:
        print(flush=True)  # off the prompt's line
        raise signals.failure
    if signals.reason is not None:
        print(f"\nglm-tp: stopped by {signals.reason}", file=sys.stderr, flush=True)
