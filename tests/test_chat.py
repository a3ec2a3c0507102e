"""Chat: the templates, a conversation kept in the state, the CLI piped and in a real terminal."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import rwkvx
from rwkvx import templates
from rwkvx.chat import Conversation, default_template
from rwkvx.sampling import Sampler
from rwkvx.tokenizer import ByteTokenizer, load_tokenizer

from conftest import TOKENIZER_20B, save_random_model, shared_file

TESTS = os.path.dirname(__file__)


def chat_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "rwkvx.chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=TESTS)


def chatrwkv_sampler(seed):
    return Sampler(temperature=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5,
                   penalty_decay=0.996, seed=seed)


class CountingModel:
    """A model that records how many tokens each forward call feeds."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def forward(self, tokens, state=None):
        tokens = list(tokens)
        self.calls.append(len(tokens))
        return self.model.forward(tokens, state)

    def __getattr__(self, name):
        return getattr(self.model, name)


class ScriptedModel(CountingModel):
    """A model whose replies are written in advance: after the prompt, each forward call's
    logits allow only the next byte of script."""

    def __init__(self, model, script: bytes):
        super().__init__(model)
        self.script = list(script)
        self.generating = False

    def forward(self, tokens, state=None):
        logits, state = super().forward(tokens, state)
        if self.generating and self.script:
            forced = np.full_like(logits, -np.inf)
            forced[self.script.pop(0)] = 0.0
            return forced, state
        return logits, state


@pytest.fixture(scope="module")
def byte_model_path(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("chat") / "bytes.safetensors", 2, 32, 256, seed=3)


@pytest.fixture(scope="module")
def byte_model(byte_model_path):
    return rwkvx.load(str(byte_model_path))


def transcript(template, system_ids_text, turns):
    """The conversation text a chat's tokens must decode to: system, then each message and raw reply."""
    return system_ids_text + "".join(templates.user_turn(template, m) + r + templates.SEPARATOR for m, r in turns)


# ---- templates -------------------------------------------------------------------------------


def test_world_render_is_chatrwkvs_text():
    messages = [{"role": "user", "content": "  Hi there\r\n\r\n\nhow are you? "},
                {"role": "assistant", "content": "Fine."},
                {"role": "user", "content": "Good"}]
    assert templates.render(templates.WORLD, messages) == (
        "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. "
        "Please feel free to ask any question and I will always answer it.\n\n"
        "User: Hi there\nhow are you?\n\nAssistant: Fine.\n\nUser: Good\n\nAssistant:")
    with_system = templates.render(templates.WORLD, [{"role": "system", "content": "Be brief.\n\nVery."},
                                                     {"role": "user", "content": "x"}])
    assert with_system == "System: Be brief.\nVery.\n\nUser: x\n\nAssistant:"
    assert templates.render(templates.WORLD, [{"role": "user", "content": "x"}], default_system=False) == \
        "User: x\n\nAssistant:"


def test_raven_render_and_system():
    text = templates.render(templates.RAVEN, [{"role": "user", "content": "Hello"}])
    assert text.startswith("\nThe following is a coherent verbose detailed conversation between a girl named Alice")
    assert text.endswith("So please go ahead!\n\nBob: Hello\n\nAlice:")
    assert templates.system_text(templates.RAVEN, "Alice is a pirate.") == "\nAlice is a pirate.\n\n"
    assert templates.system_text(templates.RAVEN, "") == ""
    assert templates.stop_strings(templates.RAVEN) == ("\n\n", "\nBob:", "\nAlice:")


def test_normalize_never_leaves_a_separator():
    assert templates.normalize("a\n\n\n\nb\r\rc\r\n\r\nd") == "a\nb\nc\nd"
    assert templates.SEPARATOR not in templates.turn(templates.WORLD, "user", "x\n\n\ny")[:-2]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "x"}], "message 0: message role: expected one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "message 0: message content: expected a string, got int"),
    ([{"role": "user"}], "message 0: expected a mapping with 'role' and 'content'"),
])
def test_render_rejects_bad_messages(messages, message):
    with pytest.raises(rwkvx.RwkvxError, match=message):
        templates.render(templates.WORLD, messages)


def test_segments_use_the_in_context_tokens_of_the_20b_tokenizer():
    tok = load_tokenizer(shared_file(TOKENIZER_20B), 50277)
    # "\n\n" alone at the end is token 535; before "Bob:" it is 187, 187 (ChatRWKV's fix_tokens)
    assert tok.encode("Hi\n\n")[-1] == 535
    ids = templates.encode_segment(tok.encode, "Hi\n\n", "Bob:")
    assert ids[-2:] == [187, 187] and tok.decode(ids) == "Hi\n\n"
    assert isinstance(load_tokenizer(TOKENIZER_20B, 50277), rwkvx.HFTokenizer)
    assert default_template(tok) is templates.RAVEN
    assert default_template(ByteTokenizer()) is templates.WORLD


# ---- a conversation in the state -------------------------------------------------------------


def test_each_turn_feeds_only_its_new_tokens(byte_model):
    model = CountingModel(byte_model)
    tok = ByteTokenizer()
    chat = Conversation(model, tok, templates.WORLD, chatrwkv_sampler(1), max_tokens=24)
    system_calls = sum(model.calls)
    turns = []
    per_turn = []
    for i in range(8):
        before_calls, before_tokens = len(model.calls), len(chat.tokens)
        message = f"message number {i}"
        reply = chat.say(message)
        text = "".join(reply)
        turns.append((message, reply.text))
        fed = model.calls[before_calls:]
        per_turn.append(sum(fed))
        # what went in this turn is exactly what the conversation grew by: nothing was fed twice
        assert sum(fed) == len(chat.tokens) - before_tokens
        assert max(fed) <= len(templates.user_turn(templates.WORLD, message).encode()) + 2
        assert text == reply.text
    assert system_calls + sum(per_turn) == len(chat.tokens) == chat.n_tokens
    assert tok.decode(chat.tokens) == transcript(templates.WORLD, templates.WORLD.default_system, turns)
    # the state is the state of exactly those tokens
    np.testing.assert_array_equal(chat.state, byte_model.forward(chat.tokens)[1])


@pytest.mark.parametrize("script, fed_after_stop", [
    # the usual end: the token that completed "\n\n" is fed, as ChatRWKV does
    (b" ab\n\nUser: more", [10]),
    # the next speaker's name: back to the state after " ab\n", then the missing "\n"
    (b" ab\nUser: more", [10]),
    (b" ab\nAssistant: more", [10]),
])
def test_a_reply_ends_with_exactly_its_text_and_the_separator(byte_model, script, fed_after_stop):
    tok = ByteTokenizer()
    model = ScriptedModel(byte_model, script)
    chat = Conversation(model, tok, templates.WORLD, chatrwkv_sampler(0), max_tokens=50)
    model.generating = True
    calls_before, tokens_before = len(model.calls), len(chat.tokens)
    reply = chat.say("hi")
    assert "".join(reply) == " ab" and reply.stop_reason == "stop"
    assert tok.decode(chat.tokens).endswith("User: hi\n\nAssistant: ab\n\n")
    # the prompt, then the generated tokens one by one (the stop's last one not), then the fix
    calls = model.calls[calls_before:]
    assert calls[0] == len(templates.user_turn(templates.WORLD, "hi")) and calls[-1] == len(fed_after_stop)
    assert len(chat.tokens) - tokens_before == calls[0] + len(" ab\n\n")
    np.testing.assert_array_equal(chat.state, byte_model.forward(chat.tokens)[1])


def test_system_prompt_choices(byte_model):
    tok = ByteTokenizer()
    none = Conversation(byte_model, tok, templates.WORLD, chatrwkv_sampler(0), system="")
    assert none.tokens == [] and np.array_equal(none.state, byte_model.new_state())
    brief = Conversation(byte_model, tok, templates.WORLD, chatrwkv_sampler(0), system="Be brief.\n\n")
    assert tok.decode(brief.tokens) == "System: Be brief.\n\n"


def test_interrupt_keeps_what_was_shown_then_the_separator(byte_model):
    tok = ByteTokenizer()
    chat = Conversation(byte_model, tok, templates.WORLD, chatrwkv_sampler(2), max_tokens=200)
    reply = chat.say("hello")
    shown = ""
    for i, piece in enumerate(reply):
        shown += piece
        if i == 5:
            chat.interrupt()
    assert reply.stop_reason == "interrupted" and shown == reply.text
    assert 0 < len(reply.tokens) < 200
    expected = transcript(templates.WORLD, templates.WORLD.default_system, [("hello", shown)])
    assert tok.decode(chat.tokens) == expected
    np.testing.assert_array_equal(chat.state, byte_model.forward(chat.tokens)[1])
    # the next reply starts normally
    nxt = chat.say("go on")
    "".join(nxt)
    assert nxt.stop_reason != "interrupted" and nxt.tokens


def test_interrupt_before_the_first_token(byte_model):
    tok = ByteTokenizer()
    chat = Conversation(byte_model, tok, templates.WORLD, chatrwkv_sampler(2), max_tokens=50)
    reply = chat.say("hello")
    chat.interrupt()
    assert "".join(reply) == "" and reply.stop_reason == "interrupted"
    assert tok.decode(chat.tokens).endswith("User: hello\n\nAssistant:\n\n")
    np.testing.assert_array_equal(chat.state, byte_model.forward(chat.tokens)[1])


def test_retry_replaces_the_last_reply(byte_model):
    tok = ByteTokenizer()
    chat = Conversation(byte_model, tok, templates.WORLD, chatrwkv_sampler(4), max_tokens=30)
    first = chat.say("hello")
    "".join(first)
    second = chat.retry()
    "".join(second)
    assert first.tokens != second.tokens
    assert tok.decode(chat.tokens) == transcript(templates.WORLD, templates.WORLD.default_system,
                                                  [("hello", second.text)])
    np.testing.assert_array_equal(chat.state, byte_model.forward(chat.tokens)[1])
    chat.reset()
    assert not chat.can_retry
    with pytest.raises(rwkvx.RwkvxError, match="nothing to retry"):
        chat.retry()


def test_raven_conversation_with_the_20b_tokenizer(tmp_path):
    tok = load_tokenizer(shared_file(TOKENIZER_20B), 50277)
    model = rwkvx.load(str(save_random_model(tmp_path / "pile.safetensors", 1, 16, 50277)))
    chat = Conversation(model, tok, default_template(tok), chatrwkv_sampler(0), max_tokens=8)
    assert chat.tokens[-2:] == [187, 187]
    turns = []
    for message in ("Hello Alice", "What is tea?"):
        reply = chat.say(message)
        "".join(reply)
        turns.append((message, reply.text))
    assert tok.decode(chat.tokens) == transcript(templates.RAVEN, templates.RAVEN.default_system, turns)
    np.testing.assert_array_equal(chat.state, model.forward(chat.tokens)[1])


# ---- the command line, piped ------------------------------------------------------------------


def test_piped_chat_is_scriptable_and_reset_replays(byte_model_path):
    fresh = chat_cli("-m", byte_model_path, "-s", "9", "-n", "16", stdin="hi\n")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.endswith("\n") and fresh.stdout.strip()
    assert "Traceback" not in fresh.stderr
    assert all(line.startswith("rwkvx: ") for line in fresh.stderr.splitlines())
    # /reset returns to the system prompt's state: the same seed gives the same reply as a fresh start
    after_reset = chat_cli("-m", byte_model_path, "-s", "9", "-n", "16", stdin="hello\n\n/reset\nhi\n")
    assert after_reset.returncode == 0, after_reset.stderr
    assert "conversation reset" in after_reset.stderr
    assert after_reset.stdout.endswith(fresh.stdout) and after_reset.stdout != fresh.stdout


# the repeat penalty's window reaches back into the conversation: after --load it must come from
# the saved tokens
@pytest.mark.parametrize("sampling", [[], ["--repeat-penalty", "1.3"]])
def test_demo_save_and_load_resume_identically(tmp_path, sampling):
    saved = tmp_path / "conversation.state"
    messages = ["What is a list?", "And a dict?", "And a set?"]
    flags = ["-m", "demo", "-s", "5", *sampling]
    whole = chat_cli(*flags, stdin="\n".join(messages) + "\n")
    first = chat_cli(*flags, stdin=f"{messages[0]}\n/save {saved}\n")
    rest = chat_cli(*flags, "--load", saved, stdin="\n".join(messages[1:]) + "\n")
    for result in (whole, first, rest):
        assert result.returncode == 0, result.stderr
    assert f"to {saved}" in first.stderr and f"from {saved}" in rest.stderr
    assert first.stdout + rest.stdout == whole.stdout
    assert len(whole.stdout.strip()) > 20


def test_bad_file_for_load_costs_one_line(byte_model_path, tmp_path):
    garbage = tmp_path / "garbage.state"
    garbage.write_bytes(b"not a state at all")
    result = chat_cli("-m", byte_model_path, "-s", "1", "-n", "8",
                      stdin=f"/load {garbage}\n/load\n/frobnicate\nhi\n/retry\n")
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 3 and all(line.startswith("rwkvx: error: ") for line in errors)
    assert str(garbage) in errors[0] and "/load needs a file name" in errors[1] and "/frobnicate" in errors[2]
    assert result.stdout.strip()
    # a state of another checkpoint of the same shape loads, with a one-line warning
    twin = rwkvx.load(str(save_random_model(tmp_path / "twin.safetensors", 2, 32, 256, seed=4)))
    twin.save_state(tmp_path / "twin.state", twin.forward([1, 2])[1], [1, 2])
    warned = chat_cli("-m", byte_model_path, "-s", "1", "-n", "8", stdin=f"/load {tmp_path / 'twin.state'}\nhi\n")
    assert warned.returncode == 0 and warned.stdout.strip()
    warnings = [line for line in warned.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("rwkvx: warning: ") and "different checkpoint" in warnings[0]
    assert "loaded a conversation of 2 tokens" in warned.stderr
    # a state of another shape is refused at start-up, in one line
    other = rwkvx.load(str(save_random_model(tmp_path / "other.safetensors", 1, 16, 256)))
    other.save_state(tmp_path / "other.state", other.new_state())
    refused = chat_cli("-m", byte_model_path, "--load", tmp_path / "other.state", stdin="hi\n")
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 2 and refused.stderr.splitlines()[-1].startswith("rwkvx: error: ")


@pytest.mark.parametrize("flags", [["--temp", "-1"], ["--template", "klingon"], ["-n", "0"],
                                   ["--top-p", "0"], ["--load", "/no/such/file.state"], ["--bogus"],
                                   ["--logit-bias", "999+1"]])
def test_bad_flags_exit_2_with_one_line(byte_model_path, flags):
    result = chat_cli("-m", byte_model_path, *flags, stdin="hi\n")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("rwkvx: error: ") and "Traceback" not in result.stderr
    # everything before the error is the load line (for a file given with --load; a token id
    # outside the vocabulary is found once the model is loaded)
    assert len(lines) <= 2 and result.stdout == ""
    assert "system prompt" not in result.stderr


# ---- the command line in a real terminal ----------------------------------------------------------


class Tmux:
    """A tmux server of its own (its socket in a fresh short folder: sockets have a length limit)."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="rwkvx-tmux-")
        self.socket = os.path.join(self.folder, "socket")
        self("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", "bash --norc --noprofile")

    def __call__(self, *args):
        return subprocess.run(["tmux", "-S", self.socket, "-f", os.devnull, *args],
                              capture_output=True, text=True, timeout=20).stdout

    def keys(self, *keys):
        self("send-keys", "-t", "chat", *keys)

    def screen(self):
        return self("capture-pane", "-p", "-J", "-t", "chat", "-S", "-")

    def wait_for(self, predicate, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"timed out; the terminal shows:\n{self.screen()}")

    def close(self):
        self("kill-server")
        shutil.rmtree(self.folder, ignore_errors=True)


def _reply_lines(screen):
    return [line for line in screen.splitlines() if line.startswith("Assistant: ")]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_terminal_ctrl_c_stops_a_reply_and_ctrl_d_exits_0():
    tmux = Tmux()
    try:
        # the demo with line breaks banned never ends a reply by itself: only -n or Ctrl-C end it
        command = (f"cd {shlex.quote(TESTS)}; PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} "
                   f"{shlex.quote(sys.executable)} -m rwkvx.chat -m demo -s 3 -n 100000 --logit-bias 10-inf; "
                   "echo EXIT=$?")
        tmux.keys(command, "Enter")
        tmux.wait_for(lambda s: s.rstrip().endswith("User:"))
        tmux.keys("What is a module?", "Enter")
        first = tmux.wait_for(lambda s: len(_reply_lines(s)) == 1 and len(_reply_lines(s)[0]) > 40)
        # it streams: the reply keeps growing on the screen
        later = tmux.wait_for(lambda s: len(_reply_lines(s)[0]) > len(_reply_lines(first)[0]) + 20)
        tmux.keys("C-c")
        stopped = tmux.wait_for(lambda s: "stopped; what was shown stays" in s and s.rstrip().endswith("User:"))
        assert len(_reply_lines(stopped)[0]) >= len(_reply_lines(later)[0])
        assert not re.search(r"^EXIT=", stopped, re.M) and "Traceback" not in stopped
        tmux.keys("Thanks", "Enter")
        tmux.wait_for(lambda s: len(_reply_lines(s)) == 2 and len(_reply_lines(s)[1]) > 30)
        tmux.keys("C-c")
        tmux.wait_for(lambda s: s.count("stopped; what was shown stays") == 2 and s.rstrip().endswith("User:"))
        tmux.keys("C-d")
        final = tmux.wait_for(lambda s: re.search(r"^EXIT=", s, re.M))
        assert re.search(r"^EXIT=0$", final, re.M) and "Traceback" not in final
    finally:
        tmux.close()
