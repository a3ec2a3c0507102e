"""Command line: chat with an RWKV model in the terminal.

    python -m rwkvx.chat -m RWKV-4-Raven-3B-v12.pth --tokenizer 20B_tokenizer.json

The conversation lives in the model's state: each turn feeds only its new tokens, so the
50th turn costs what the first did, and a conversation is saved and resumed as one small file
(/save, --load). Turns are written as ChatRWKV writes them (rwkvx.templates). Typed lines
starting with "/" are commands (/help lists them).

In a terminal, replies stream as they are generated; Ctrl-C stops a reply (what was shown
stays in the conversation), Ctrl-C at the prompt or Ctrl-D quits. With stdin not a terminal,
each input line is one message, each reply is written to stdout followed by a line break,
everything else goes to stderr, and the end of input ends the chat with status 0.
"""
from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from collections import deque

import numpy as np

from rwkvx import templates
from rwkvx._cli import (EXIT_OK, Parser, add_model_args, add_sampling_args, int_at_least, is_demo, load_model,
                        log, model_summary, run_main, sampler_from_args, with_warnings)
from rwkvx.errors import RwkvxError
from rwkvx.generate import generate
from rwkvx.tokenizer import HFTokenizer

DEFAULT_MAX_TOKENS = 500

HELP = """\
commands (type them as a message):
  /reset       start again from the system prompt
  /retry       write the last reply again (differently)
  /save FILE   save the conversation (its state and tokens) to FILE
  /load FILE   continue a conversation saved with /save
  /help        this list
  /quit        leave (also Ctrl-D)
to send a message that starts with "/", type "//..."; Ctrl-C stops a reply."""

# Control characters other than line breaks and tabs (C0, DEL, C1), shown as U+FFFD in a terminal:
# a model's text must not move the cursor or send escape sequences to it.
_CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0)]}


def default_template(tokenizer) -> templates.Template:
    """Raven's Bob/Alice for the 20B tokenizer (RWKV-4 Pile/Raven); World's User/Assistant otherwise."""
    return templates.RAVEN if isinstance(tokenizer, HFTokenizer) else templates.WORLD


class _Interrupted(Exception):
    """Raised inside generation, before a forward call, when a stop was requested."""


class _Feed:
    """The model as one reply's generation loop sees it: records what was fed and the states
    after the last few calls, and stops (before feeding anything) once a stop is requested."""

    # Rewinding a reply to where its text and the tokens part (a stop string, a character cut
    # by Ctrl-C) needs the states of its last few tokens: the longest stop string is 11 bytes.
    KEEP = 16

    def __init__(self, model, stop_requested) -> None:
        self._model = model
        self._stop_requested = stop_requested
        self.n_vocab = model.n_vocab
        self.calls = 0
        # (tokens generated and fed, state after them); the first call feeds the prompt
        self.states: deque = deque(maxlen=self.KEEP)
        self.prompt_state = None
        self.times: list[float] = []

    def forward(self, tokens, state=None):
        if self._stop_requested():
            raise _Interrupted
        self.times.append(time.perf_counter())
        logits, state = self._model.forward(tokens, state)
        if self.calls == 0:
            self.prompt_state = state
        self.calls += 1
        self.states.append((self.calls - 1, state))
        return logits, state

    def state_after(self, n_generated: int):
        """The state after the prompt and n_generated generated tokens, if still kept."""
        for n, state in self.states:
            if n == n_generated:
                return state
        return self.prompt_state if n_generated == 0 else None


class Reply:
    """One reply being generated. Iterate for its text in pieces (raw: it starts with the space
    the model writes after the assistant's name); when iteration ends, however it ends, the
    conversation holds exactly the text that was yielded, then the turn separator.

    After iteration: ``text`` (raw), ``tokens`` (generated), ``stop_reason`` ("stop", "eos",
    "length" or "interrupted"), ``first_token_seconds`` (from the message to the first sampled
    token) and ``token_seconds`` (mean time per later token; 0 with fewer than 2 tokens).
    """

    def __init__(self, conversation: Conversation, stream, feed: _Feed, started: float) -> None:
        self._conversation = conversation
        self._stream = stream
        self._feed = feed
        self._started = started
        self.text = ""
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self.first_token_seconds = 0.0
        self.token_seconds = 0.0
        self._pieces = self._run()

    def __iter__(self):
        return self._pieces

    def _run(self):
        try:
            for piece in self._stream:
                yield piece
        except _Interrupted:
            self.stop_reason = "interrupted"
        finally:
            self._finish()

    def _finish(self) -> None:
        end = time.perf_counter()
        stream = self._stream
        self.text = stream.text
        self.tokens = list(stream.tokens)
        self.stop_reason = self.stop_reason or stream.stop_reason
        # the forward calls after the prompt start once a token was sampled and decoded
        times = self._feed.times[1:] + [end]
        n = len(self.tokens)
        if n:
            self.first_token_seconds = times[0] - self._started
            if n > 1:
                self.token_seconds = (end - times[0]) / (n - 1)
        self._conversation._commit(self, self._feed)


class Conversation:
    """A chat with a model, kept as a state and the tokens that made it.

    It starts after the system prompt (the template's introduction for None), or from the
    conversation saved in the file ``load``. ``say(message)`` and ``retry()`` return a
    :class:`Reply` to iterate, one at a time; ``reset()`` goes back to the system prompt;
    ``save(path)``/``load(path)`` keep a conversation in a state file.
    Each reply's sampler is a copy of ``sampler`` seeded from (its seed, the conversation's
    length, the retry count), so a conversation replays identically, also after save and load,
    and /retry gives another reply. ``interrupt()`` (e.g. from a signal handler) stops the
    reply being generated at its next token.
    """

    def __init__(self, model, tokenizer, template: templates.Template, sampler, *,
                 system: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, load=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens
        self._sampler = sampler
        # every separator in the conversation is followed by the user's name
        self._following = f"{template.user}:"
        self._system_ids = templates.encode_segment(tokenizer.encode, templates.system_text(template, system),
                                                    self._following)
        self._system_state = None
        self._stop = False
        self.state = None
        self.tokens: list[int] | None = []
        self.n_tokens = 0
        # (state before the last message, the message's tokens, the tokens and their count before it)
        self._retry_point = None
        self._attempt = 0
        # a saved conversation already holds its system prompt: feed it only for /reset
        if load is None:
            self.reset()
        else:
            self.load(load)

    def reset(self) -> None:
        """Go back to the state after the system prompt."""
        if self._system_state is None:
            self._system_state = (self.model.forward(self._system_ids)[1] if self._system_ids
                                  else self.model.new_state())
        self.state = self._system_state
        self.tokens = list(self._system_ids)
        self.n_tokens = len(self._system_ids)
        self._retry_point = None

    def interrupt(self) -> None:
        """Ask the reply being generated to stop before its next token."""
        self._stop = True

    def say(self, message: str) -> Reply:
        """Feed the user's message and return the reply to it, to iterate."""
        started = time.perf_counter()
        ids = self.tokenizer.encode(templates.user_turn(self.template, message))
        self._retry_point = (self.state, ids, None if self.tokens is None else list(self.tokens), self.n_tokens)
        self._attempt = 0
        return self._reply(started)

    @property
    def can_retry(self) -> bool:
        """True when there is a reply to write again (none after the start, reset or load)."""
        return self._retry_point is not None

    def retry(self) -> Reply:
        """Generate the last reply again from the state before it (with another random draw)."""
        if self._retry_point is None:
            raise RwkvxError("nothing to retry: no reply since the start, /reset or /load")
        self._attempt += 1
        return self._reply(time.perf_counter())

    def _reply(self, started: float) -> Reply:
        state, prompt, before, position = self._retry_point
        sampler = copy.deepcopy(self._sampler)
        if sampler.seed is not None:
            sampler.seed = int(np.random.SeedSequence([sampler.seed, position, self._attempt]).generate_state(1)[0])
        sampler.reset()
        # a stop request is for the reply that was running, not for this one
        self._stop = False
        # the repeat penalty's window reaches back into the conversation behind the state
        window = getattr(sampler, "repeat_last_n", 0)
        if before and window:
            sampler.accept_prompt(before if window < 0 else before[-window:])
        feed = _Feed(self.model, lambda: self._stop)
        stream = generate(feed, self.tokenizer, prompt, max_tokens=self.max_tokens, sampler=sampler,
                          stop=templates.stop_strings(self.template), state=state)
        return Reply(self, stream, feed, started)

    def _commit(self, reply: Reply, feed: _Feed) -> None:
        """Make the state hold the prompt, the reply's text as it was yielded, and the separator.

        Generation leaves out the token that completed a stop string (or the eos), and Ctrl-C
        can stop it between tokens or inside a character. The generated tokens are kept as
        far as their text is the start of the reply's text + separator; if the next one
        completes exactly that (the usual end at "\\n\\n") it is fed too, as ChatRWKV does, and
        otherwise the rest of the text is encoded and fed. The states of the last few tokens
        are at hand, so nothing is fed twice unless that rewind is longer than they reach.
        """
        state0, prompt, base, position = self._retry_point
        model = self.model
        generated = list(reply.tokens)
        if reply.stop_reason == "eos" and generated:
            generated.pop()
        n_fed = max(feed.calls - 1, 0)
        target = reply.text + templates.SEPARATOR
        for k in range(len(generated), -1, -1):
            head = self.tokenizer.decode(generated[:k])
            if target.startswith(head):
                break
        if feed.calls == 0:
            # stopped before the prompt went in
            state, j = model.forward(prompt, state0)[1], 0
        else:
            j = min(k, n_fed)
            state = feed.state_after(j)
            if state is None:
                state, j = feed.prompt_state, 0
        extra = generated[j:k] + templates.encode_segment(self.tokenizer.encode, target[len(head):],
                                                          self._following)
        if extra:
            state = model.forward(extra, state)[1]
        self.state = state
        added = prompt + generated[:j] + extra
        self.tokens = None if base is None else base + added
        self.n_tokens = position + len(added)

    def save(self, path) -> None:
        """Write the conversation's state and tokens to path (see model.save_state)."""
        self.model.save_state(path, self.state, self.tokens)

    def load(self, path) -> None:
        """Continue the conversation saved in path; CheckpointError for a bad file."""
        state, tokens = self.model.load_state(path)
        self.state, self.tokens = state, tokens
        self.n_tokens = 0 if tokens is None else len(tokens)
        self._retry_point = None


# ---- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rwkvx.chat",
        description="Chat with an RWKV model. Each turn feeds only its new tokens: the conversation "
                    "is the model's state. Type /help in the chat for its commands.",
        epilog="In a terminal: Ctrl-C stops a reply, Ctrl-C at the prompt or Ctrl-D quits. With stdin "
               "not a terminal, each line is a message and each reply one block of stdout text.",
    )
    add_model_args(p)
    p.add_argument("-n", "--n-predict", type=int_at_least(1), default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="most tokens per reply (default: %(default)s)")
    p.add_argument("--template", choices=sorted(templates.TEMPLATES),
                   help="turn format: world (User:/Assistant:) or raven (Bob:/Alice:) (default: raven for "
                        "the 20B tokenizer, world otherwise)")
    p.add_argument("--system", metavar="TEXT",
                   help="system prompt, instead of the template's introduction ('' for none)")
    p.add_argument("--load", metavar="FILE", help="continue a conversation saved with /save")
    p.add_argument("--stats", action="store_true",
                   help="after each reply, print its tokens, time to first token and time per token")
    # ChatRWKV API_DEMO_CHAT.py: GEN_TEMP 1.0, GEN_TOP_P 0.3, presence 0.5, frequency 0.5, decay 0.996
    add_sampling_args(p, temp=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5, penalty_decay=0.996)
    return p


class _Terminal:
    """Where the chat reads messages and writes replies."""

    def __init__(self, conversation: Conversation, stats: bool) -> None:
        self.conversation = conversation
        self.stats = stats
        self.interactive = sys.stdin is not None and sys.stdin.isatty()
        self.out = sys.stdout
        # a terminal or pipe that cannot show a character gets a replacement, not a crash
        if hasattr(self.out, "reconfigure"):
            self.out.reconfigure(errors="replace")
        self.user_prompt = f"{conversation.template.user}: "
        self.assistant_prefix = templates.assistant_prefix(conversation.template)

    def messages(self):
        """Yield the lines typed or piped in, until the end of input."""
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            while True:
                try:
                    yield input(self.user_prompt)
                except (EOFError, KeyboardInterrupt):
                    self.out.write("\n")
                    return
        else:
            for number, raw in enumerate(getattr(sys.stdin, "buffer", sys.stdin), start=1):
                if isinstance(raw, str):
                    yield raw.rstrip("\r\n")
                    continue
                try:
                    yield raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    log(f"error: input line {number} is not UTF-8 text; skipped")

    def show(self, make_reply) -> None:
        """Feed a message and stream its reply (make_reply() returns it); Ctrl-C stops the reply
        and the state keeps what was shown."""
        out = self.out
        if self.interactive:
            out.write(self.assistant_prefix + " ")
            out.flush()
        started = False
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda *_: self.conversation.interrupt())
        try:
            reply = make_reply()
            for piece in reply:
                if not started:
                    # the model starts its reply with a space after the name
                    piece = piece.lstrip()
                    started = bool(piece)
                if self.interactive:
                    piece = piece.translate(_CONTROLS)
                out.write(piece)
                out.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        out.write("\n\n" if self.interactive else "\n")
        out.flush()
        if reply.stop_reason == "interrupted":
            log("stopped; what was shown stays in the conversation")
        elif reply.stop_reason == "length":
            log(f"reply cut at -n {self.conversation.max_tokens} tokens")
        if self.stats:
            log(f"{len(reply.tokens)} tokens, first after {reply.first_token_seconds * 1000:.1f} ms, "
                f"{reply.token_seconds * 1000:.1f} ms per token after it, stop: {reply.stop_reason}; "
                f"conversation {self.conversation.n_tokens} tokens")


def _command(line: str, conversation: Conversation, terminal: _Terminal) -> bool:
    """Run a /command; returns False for /quit."""
    name, _, argument = line[1:].partition(" ")
    argument = argument.strip()
    if name == "quit":
        return False
    if name == "help":
        print(HELP, file=sys.stderr)
    elif name == "reset":
        conversation.reset()
        log("conversation reset")
    elif name == "retry":
        if not conversation.can_retry:
            raise RwkvxError("nothing to retry: no reply since the start, /reset or /load")
        terminal.show(conversation.retry)
    elif name in ("save", "load"):
        if not argument:
            raise RwkvxError(f"/{name} needs a file name: /{name} FILE")
        if name == "save":
            conversation.save(argument)
            log(f"saved the conversation ({conversation.n_tokens} tokens) to {argument}")
        else:
            with_warnings(lambda: conversation.load(argument))
            log(f"loaded a conversation of {conversation.n_tokens} tokens from {argument}")
    else:
        raise RwkvxError(f"unknown command /{name} (/help lists them; start a message with // to send a '/')")
    return True


def _chat(args) -> int:
    model, tokenizer, load_seconds = load_model(args)
    # made after loading, so that --logit-bias ids are checked against the vocabulary now
    sampler = sampler_from_args(args, n_vocab=model.n_vocab)
    log(f"{model_summary(args, model, load_seconds)}, seed {args.seed}")
    template = templates.TEMPLATES[args.template] if args.template else default_template(tokenizer)
    started = time.perf_counter()
    conversation = with_warnings(lambda: Conversation(model, tokenizer, template, sampler, system=args.system,
                                                       max_tokens=args.n_predict, load=args.load))
    if args.load:
        log(f"loaded a conversation of {conversation.n_tokens} tokens from {args.load}")
    else:
        log(f"system prompt: {conversation.n_tokens} tokens in {time.perf_counter() - started:.2f} s")
    terminal = _Terminal(conversation, args.stats)
    log(f"template {template.name} ({template.user}/{template.assistant}); /help for commands"
        + ("; Ctrl-C stops a reply, Ctrl-D quits" if terminal.interactive else ""))
    if is_demo(args):
        log("this is rwkvx's small demo model, trained on Python's documentation, not on conversations: "
            "expect text about Python, not answers")

    for line in terminal.messages():
        message = line.strip()
        if not message:
            continue
        if message.startswith("/") and not message.startswith("//"):
            try:
                if not _command(message, conversation, terminal):
                    break
            except RwkvxError as e:
                # a bad command or file costs one line, not the conversation
                log(f"error: {e}")
            continue
        if message.startswith("//"):
            message = message[1:]
        try:
            terminal.show(lambda: conversation.say(message))
        except RwkvxError as e:
            # e.g. a message the tokenizer cannot encode: one line, and the chat goes on
            log(f"error: {e}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the chat; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    return run_main(lambda: _chat(build_parser().parse_args(argv)),
                    out_of_memory_hint=" (try --dtype uint8 or a smaller model)")


if __name__ == "__main__":
    raise SystemExit(main())
