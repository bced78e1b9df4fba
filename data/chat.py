"""Chat rows -> rendered text -> token ids with a supervision mask computed from character offsets.

    from data.chat import is_chat_data, load_conversations, tokenize_conversations
    if is_chat_data(paths):
        conversations = load_conversations(paths)          # [(where, messages)] with where = "file.jsonl:LINE"
    [(ids, mask)] = tokenize_conversations([messages], ["example id"], tokenizer)

A chat row is `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` with at least one
assistant message (any other role is an error naming file, line and role); other keys of a message are passed to the chat
template untouched. The conversation is rendered with the
tokenizer's chat template (or, when it has none, HH_CHAT_TEMPLATE: the "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript form of
the preference datasets) and tokenized once, without special tokens, with the fast tokenizer's offset mapping.

Only assistant turns are supervised. The characters of assistant turn i are those between the end of the conversation rendered
up to turn i with the generation prompt and the end of it rendered through turn i, so the template's end-of-turn marker is
learned too. A token is supervised when it covers any of those characters; token ids are never matched against a template,
so merges across the boundary cannot hide a turn. When a template does not render turn by turn as prefixes of the whole text,
the span is the message content found in the rendered text instead. EOS is appended (supervised) after a final assistant turn
unless that turn already contains it; an EOS inside a message's content is an error, as for single-turn data.
"""

from __future__ import annotations

import bisect
import difflib
import json

from data.files import DataError, iter_rows

HH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}"
    "{% else %}{{ '\n\nHuman: ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "prompter": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def is_chat_data(paths: list[str]) -> bool:
    """Whether the files hold chat rows: decided by the first row (a `messages` field and no `prompt`)."""
    for _, row in iter_rows(paths):
        return "messages" in row and "prompt" not in row
    return False


def check_messages(where: str, row: dict) -> list[dict]:
    messages = row.get("messages")
    if "prompt" in row or not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a chat row {{\"messages\": [{{\"role\", \"content\"}}, ...]}} like the file's first row")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{j}] must be an object with string fields 'role' and 'content', got {message!r:.100}")
        if message["role"] not in ROLES:
            close = difflib.get_close_matches(message["role"].lower(), ROLES, n=1, cutoff=0.6)
            close = close or [ROLE_ALIASES[message["role"].lower()]] if message["role"].lower() in ROLE_ALIASES else close
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: messages[{j}] has role {message['role']!r}{hint}; roles are {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing would be supervised")
    return messages


def load_conversations(paths: list[str]) -> list[tuple[str, list[dict]]]:
    """Every row of the files, validated, in file order; each example is one row (no merging)."""
    return [(where, check_messages(where, row)) for where, row in iter_rows(paths)]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    template = tokenizer.chat_template or HH_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    text = render(tokenizer, messages)
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if i == 0:  # no earlier turns: the turn starts where its content does
            before = through[: max(through.find(message["content"]), 0)]
        if text.startswith(through) and through.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(through)
        else:
            start = text.find(message["content"], cursor)
            if start == -1:
                raise DataError(f"the chat template does not render assistant message {i} verbatim; cannot locate it")
            end = start + len(message["content"])
        spans.append((start, end))
        cursor = end
    return text, spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a span (an empty token counts when it sits inside one)."""
    starts = [s for s, _ in spans]
    mask = []
    for s, e in offsets:
        j = bisect.bisect_right(starts, s) - 1  # the last span starting at or before the token
        hit = False
        for a, b in spans[max(j, 0) : j + 2]:  # that span and the next one may overlap the token
            if (max(s, a) < min(e, b)) or (s == e and a <= s < b):
                hit = True
        mask.append(int(hit))
    return mask


def tokenize_conversations(conversations: list[list[dict]], example_ids: list[str], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation; see the module docstring for the rules."""
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    texts, all_spans = [], []
    for messages, example_id in zip(conversations, example_ids):
        for j, m in enumerate(messages):
            if eos_text and eos_text in m["content"]:
                raise DataError(f"example {example_id}: messages[{j}] contains the EOS token {eos_text!r}")
        try:
            text, spans = assistant_spans(tokenizer, messages)
        except DataError as e:
            raise DataError(f"example {example_id}: {e}") from None
        texts.append(text)
        all_spans.append(spans)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for messages, ids, offsets, spans in zip(conversations, encoded["input_ids"], encoded["offset_mapping"], all_spans):
        mask = token_mask([tuple(o) for o in offsets], spans)
        if messages[-1]["role"] == "assistant":
            last = [t for t, s in zip(ids, offsets) if max(s[0], spans[-1][0]) < min(s[1], spans[-1][1])]
            if eos not in last:
                ids, mask = ids + [eos], mask + [1]
        out.append((list(ids), mask))
    return out


def conversation_json(messages: list[dict]) -> str:
    """The form chat examples carry through datasets columns (message objects may hold extra template fields)."""
    return json.dumps(messages, ensure_ascii=False)
