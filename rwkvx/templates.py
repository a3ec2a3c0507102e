"""Chat templates: how a conversation is written as the text an RWKV chat model was trained on.

Pure functions, no I/O: ``python -m rwkvx.chat`` renders its turns with them, and a server
renders an OpenAI-style ``messages`` list with :func:`render`. Two templates, both as ChatRWKV
writes them:

**world** (RWKV World models, and the default for byte vocabularies)::

    User: hi

    Assistant: Hi. I am your assistant and I will provide expert full response in full details. [...]

    User: <message>

    Assistant: <reply>

**raven** (RWKV-4 Raven/Pile models, 20B tokenizer): ``Bob:``/``Alice:`` turns after ChatRWKV's
Alice-and-Bob introduction (see :data:`RAVEN`).

Rules, from ChatRWKV (API_DEMO_CHAT.py, v2/chat.py) and rwkv.cpp (python/chat_with_bot.py):

- Turns are separated by a blank line, ``"\\n\\n"`` (:data:`SEPARATOR`); a reply ends there.
- A message is normalised first (:func:`normalize`): ``\\r\\n`` and ``\\r`` become ``\\n``, every
  run of line breaks becomes one (so a message can never contain the separator), and the
  ends are stripped.
- A turn is ``"<Name>: <message>\\n\\n"``; the prompt for a reply ends with ``"<Assistant>:"``
  and no space: the model writes the space itself, so a raw reply starts with one.
- A system prompt given by the caller replaces the template's default introduction: world
  writes it as a ``System:`` turn (the form RWKV-Runner's chat API uses), raven as the
  introductory paragraph of ChatRWKV's prompt files. An empty system prompt means none.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rwkvx.errors import RwkvxError

__all__ = ["Template", "WORLD", "RAVEN", "TEMPLATES", "SEPARATOR", "ROLES", "normalize", "system_text",
           "turn", "assistant_prefix", "user_turn", "render", "stop_strings", "clean_reply", "encode_segment"]

SEPARATOR = "\n\n"
ROLES = ("system", "user", "assistant")

_LINE_BREAKS = re.compile(r"\n+")


@dataclass(frozen=True)
class Template:
    """One chat format.

    - ``name``: "world" or "raven" (what ``--template`` takes).
    - ``user``, ``assistant``: the speakers' names as the model saw them (``User``/``Assistant``).
    - ``default_system``: the text that starts every conversation without a system prompt,
      ending with the separator.
    - ``system_prefix`` and ``system_suffix``: what surrounds a caller's system prompt.
    """

    name: str
    user: str
    assistant: str
    default_system: str
    system_prefix: str
    system_suffix: str = SEPARATOR


# ChatRWKV API_DEMO_CHAT.py (init_ctx; 2026-01-07, 3008bfd) and API_DEMO_WORLD.py; rwkv.cpp's
# python/prompt/English-QA.json has the same text.
WORLD = Template(
    name="world",
    user="User",
    assistant="Assistant",
    default_system=("User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in "
                    "full details. Please feel free to ask any question and I will always answer it.\n\n"),
    system_prefix="System: ",
)

# ChatRWKV v2/prompt/default/English-2.py as v2/chat.py's load_prompt renders it ("\n" + the
# stripped text + "\n\n"); rwkv.cpp's python/prompt/English-Chat.json holds this exact string.
RAVEN = Template(
    name="raven",
    user="Bob",
    assistant="Alice",
    default_system=(
        "\nThe following is a coherent verbose detailed conversation between a girl named Alice and her friend "
        "Bob. Alice is very intelligent, creative and friendly. Alice is unlikely to disagree with Bob, and Alice "
        "doesn't like to ask Bob questions. Alice likes to tell Bob a lot about herself and her opinions. Alice "
        "usually gives Bob kind, helpful and informative advices.\n\n"
        "Bob: Hello Alice, how are you doing?\n\n"
        "Alice: Hi! Thanks, I'm fine. What about you?\n\n"
        "Bob: I am fine. It's nice to see you. Look, here is a store selling tea and juice.\n\n"
        "Alice: Sure. Let's go inside. I would like to have some Mocha latte, which is my favourite!\n\n"
        "Bob: What is it?\n\n"
        "Alice: Mocha latte is usually made with espresso, milk, chocolate, and frothed milk. Its flavors are "
        "frequently sweet.\n\n"
        "Bob: Sounds tasty. I'll try it next time. Would you like to chat with me for a while?\n\n"
        "Alice: Of course! I'm glad to answer your questions or give helpful advices. You know, I am confident "
        "with my expertise. So please go ahead!\n\n"),
    system_prefix="\n",
)

TEMPLATES = {t.name: t for t in (WORLD, RAVEN)}


def normalize(text: str) -> str:
    """A message as the model sees it: one line break at most in a row, no surrounding blanks.

    ChatRWKV's API_DEMO_CHAT.py does ``re.sub(r"\\n+", "\\n", msg.strip())``; its v2/chat.py
    replaces ``"\\n\\n"`` once, which leaves a blank line where three breaks were, so the
    complete collapse is used here.
    """
    if not isinstance(text, str):
        raise RwkvxError(f"message content: expected a string, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _LINE_BREAKS.sub("\n", text.strip())


def system_text(template: Template, system: str | None = None) -> str:
    """The text a conversation starts with: the default for None, nothing for ""."""
    if system is None:
        return template.default_system
    system = normalize(system)
    if not system:
        return ""
    return f"{template.system_prefix}{system}{template.system_suffix}"


def turn(template: Template, role: str, content: str) -> str:
    """One complete turn of a conversation, separator included."""
    if role == "user":
        name = template.user
    elif role == "assistant":
        name = template.assistant
    elif role == "system":
        return system_text(template, content)
    else:
        raise RwkvxError(f"message role: expected one of {', '.join(ROLES)}, got {role!r}")
    return f"{name}: {normalize(content)}{SEPARATOR}"


def assistant_prefix(template: Template) -> str:
    """What a reply's prompt ends with: the assistant's name and a colon, no space."""
    return f"{template.assistant}:"


def user_turn(template: Template, message: str) -> str:
    """What a chat feeds for one user message: the message's turn, then the assistant prefix."""
    return turn(template, "user", message) + assistant_prefix(template)


def render(template: Template, messages: Iterable[Mapping[str, str]], *, default_system: bool = True) -> str:
    """The prompt for the next reply to a conversation of {"role", "content"} messages.

    A leading system message replaces the template's introduction (default_system=False
    leaves it out when there is none); later system messages become system turns where they
    stand. The text ends with :func:`assistant_prefix`; the model's reply follows it.
    """
    messages = list(messages)
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RwkvxError(f"message {i}: expected a mapping with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if i == 0 and role != "system" and default_system:
            parts.append(template.default_system)
        try:
            parts.append(turn(template, role, content))
        except RwkvxError as e:
            raise RwkvxError(f"message {i}: {e}") from None
    if not messages and default_system:
        parts.append(template.default_system)
    parts.append(assistant_prefix(template))
    return "".join(parts)


def stop_strings(template: Template) -> tuple[str, ...]:
    """Where a reply ends: the separator, or either speaker's name starting a new line."""
    return (SEPARATOR, f"\n{template.user}:", f"\n{template.assistant}:")


def clean_reply(text: str) -> str:
    """A raw reply as shown to a reader: without the space the model starts it with."""
    return text.strip()


def encode_segment(encode: Callable[[str], list[int]], text: str, following: str) -> list[int]:
    """Tokens for text that will be followed by more text later, as the whole text would have them.

    A conversation is fed to the model piece by piece, so a piece ending in the separator is
    tokenized without what follows. The 20B tokenizer makes "\\n\\n" at the very end one token
    (535) but, before a word, two "\\n" (187, 187), which is what the model saw in training;
    ChatRWKV's v2/chat.py (fix_tokens) and rwkv.cpp split that last token for this reason.
    Here text is encoded with the start of what follows (e.g. "User:") and that part is
    removed again, which gives the in-context tokens for any tokenizer; if the two do not
    come apart cleanly, text is encoded alone.
    """
    if not text:
        return []
    tail = encode(following) if following else []
    if tail:
        ids = encode(text + following)
        if len(ids) > len(tail) and ids[-len(tail):] == tail:
            return ids[: -len(tail)]
    return encode(text)
